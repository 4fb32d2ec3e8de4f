"""The layout rules of docs/architecture.md, checked on the source: one installed namespace,
imports that flow one way between pipeline stages, and no import circles."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
FOLDERS = {"harness": "merge_harness", "merges": "merge_harness.merges",
           "tasks": "merge_harness.tasks", "reports": "merge_harness.reports"}
# Lowest first: a stage may import only the stages before it (and itself).
LAYERS = ("core", "merges", "io", "tasks", "train", "merge", "evaluate", "store", "selection", "reports",
          "run", "zoo", "diagnostics", "cli")


def source_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


MODULES = source_modules()


def imports_of(path: Path) -> set[str]:
    """Our modules that `path` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the project uses absolute imports)")
        names = ([f"{node.module}.{a.name}" for a in node.names] + [node.module]
                 if isinstance(node, ast.ImportFrom) and node.module else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found |= {name for name in names if name in MODULES}
    return found


GRAPH = {module: imports_of(path) - {module} for module, path in MODULES.items()}


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_stage():
    loose = [m for m in MODULES if stage(m) is None and m not in ("merge_harness", "merge_harness.__main__")]
    assert loose == []


def test_no_module_imports_a_later_stage():
    upward = [f"{module} -> {dep}" for module, deps in GRAPH.items() for dep in deps
              if stage(module) and stage(dep) and LAYERS.index(stage(dep)) > LAYERS.index(stage(module))]
    assert upward == []


def test_no_import_circles():
    done: set[str] = set()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(GRAPH[module]):
            if dep in path:
                circles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in sorted(GRAPH):
        if module not in done:
            visit(module, [module])
    assert circles == []


def test_no_code_imports_the_folder_names():
    """Every import goes through merge_harness.*: the folder names are not import names."""
    stray = []
    for path in [*MODULES.values(), *REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            stray += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert stray == []


def test_the_installed_distribution_has_one_top_level_name():
    tops = {name for name, dists in importlib.metadata.packages_distributions().items()
            if "merge-harness" in dists and not name.startswith("__editable__")}  # editable's finder
    assert tops == {"merge_harness"}


def test_a_built_wheel_installs_only_merge_harness_with_its_task_and_report_files(tmp_path):
    pytest.importorskip("setuptools")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)], capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("merge_harness-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"merge_harness"}
    for needed in ("merge_harness/tasks/toy/toy_math.yaml", "merge_harness/tasks/fixtures/gsm8k.jsonl",
                   "merge_harness/tasks/humaneval_sandboxed/utils.py", "merge_harness/reports/templates",
                   "merge_harness/merges/slta.py", "merge_harness/cli/app.py"):
        assert any(name.startswith(needed) for name in names), needed
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "merge_harness.cli.app:app" in zipfile.ZipFile(wheel).read(entry_points).decode()
