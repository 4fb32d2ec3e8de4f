"""Bad input gets one clear line, exit code 2, and loses nothing: no store, no output, no input
overwritten, and the line names the file, tensor or field at fault."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from merge_harness.cli.app import app
from tests.conftest import RUNNER_TASKS


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under `root` (links followed) by its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merge_harness", *args], capture_output=True, text=True,
                          timeout=300)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------------ the input is not the output


@pytest.fixture
def zoo(tiny_zoo, tmp_path) -> dict[str, Path]:
    """Copies of the tiny zoo, so that a failure here cannot damage the shared one."""
    root = tmp_path / "zoo"
    return {name: Path(shutil.copytree(path, root / name)) for name, path in tiny_zoo.items()}


def merge_yaml(zoo: dict[str, Path], path: Path) -> Path:
    path.write_text(
        f"method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['ft0']}\n  - model: {zoo['ft1']}\n"
    )
    return path


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", ["same", "symlink", "parent", "inside", "base"])
def test_the_output_is_never_an_input(zoo, tmp_path, case, force):
    config = merge_yaml(zoo, tmp_path / "merge.yaml")
    outputs = {"same": zoo["ft0"], "parent": zoo["ft0"].parent, "inside": zoo["ft1"] / "merged",
               "base": zoo["base"], "symlink": tmp_path / "link"}
    if case == "symlink":
        outputs["symlink"].symlink_to(zoo["ft0"], target_is_directory=True)
    before = tree_hashes(tmp_path)
    result = cli("merge", str(config), str(outputs[case]), "--quiet", *(["--force"] if force else []))
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "input model" in line and "choose another output directory" in line
    named = {"same": "ft0", "symlink": "ft0", "parent": "base", "inside": "ft1", "base": "base"}[case]
    assert str(zoo[named].resolve()) in line
    assert tree_hashes(tmp_path) == before  # nothing written, nothing replaced
    assert sorted(p.name for p in zoo["ft0"].parent.iterdir()) == sorted(zoo)


def test_a_file_given_as_a_model_directory_says_so(zoo, tmp_path):
    config = tmp_path / "merge.yaml"
    weights = zoo["ft0"] / "model.safetensors"
    config.write_text(f"method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n  - model: {weights}\n")
    result = cli("merge", str(config), str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"{weights} is a file, not a model directory" in one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ bad `run` input


QWEN = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory) -> Path:
    """A tiny Qwen2: a fine-tune of another architecture than the Llama zoo's."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen") / "qwen"
    Qwen2ForCausalLM(Qwen2Config(**QWEN)).save_pretrained(path)
    return path


def experiment_yaml(path: Path, zoo: dict[str, Path], methods: str, **fields: str) -> Path:
    values = {"base_model": str(zoo["base"]), "math": str(zoo["ft0"]), "qa": str(zoo["ft1"]),
              "tasks": f"[{', '.join(RUNNER_TASKS)}]", **fields}
    path.write_text(
        textwrap.dedent(f"""\
            name: bad-input
            base_model: {values["base_model"]}
            finetunes:
              math: {{model: {values["math"]}}}
              qa: {{model: {values["qa"]}}}
            methods:
            """)
        + textwrap.indent(textwrap.dedent(methods), "  ")
        + f"tasks: {values['tasks']}\nstore: {path.parent / 'store.sqlite'}\n"
    )
    return path


GRID = """\
- method: task_arithmetic
  grid: {lambda: [0.3, 0.5, 1.0]}
"""

BAD_RUNS = {
    "missing base model": (GRID, {"base_model": "{tmp}/no-such-base"},
                           r"e\.yaml:2: base_model: .*no-such-base: model directory not found"),
    "unknown method": ("- method: tie\n", {}, r"e\.yaml:7: methods\[0\] \(tie\): unknown merge method "
                                             r"'tie'; did you mean 'ties'"),
    "bad parameter": (GRID + "- method: ties\n  parameters: {density: 1.5}\n", {},
                      r"e\.yaml:10: methods\[1\] \(ties\): parameters\.density: Input should be less"),
    "bad per-model parameter": ("- method: ties\n  model_parameters: {qa: {density: -1}}\n", {},
                                r"e\.yaml:8: methods\[0\] \(ties\): model_parameters\.qa\.density: "),
    "unknown task": (GRID, {"tasks": "[gsm8k_fixture, no_such_task]"},
                     r"e\.yaml:9: tasks: unknown task .no_such_task."),
    "architecture mismatch": (GRID, {"qa": "{qwen}"},
                              r"methods\[0\] \(task_arithmetic\): .*qwen: architecture "
                              r"Qwen2ForCausalLM differs from LlamaForCausalLM"),
    "file instead of directory": (GRID, {"qa": "{weights}"},
                                  r"e\.yaml:5: finetunes\.qa\.model: .*model\.safetensors is a file, "
                                  r"not a model directory"),
    "nan lambda": ("- method: task_arithmetic\n  parameters: {lambda: .nan}\n", {},
                   r"e\.yaml:8: methods\[0\] \(task_arithmetic\): parameters\.lambda: must be a finite "
                   r"number, got nan"),
    "nan in a grid": ("- method: task_arithmetic\n  grid: {lambda: [0.5, .inf]}\n", {},
                      r"e\.yaml:8: methods\[0\] \(task_arithmetic\): grid\.lambda: must be a finite"),
}


def run_in_process(args: list[str], capsys) -> tuple[int, str]:
    """The CLI as `merge-harness` runs it (its one-line error handler included), in this process
    so that lm-eval's task index is built once."""
    with pytest.raises(SystemExit) as exit_info:
        app(args, prog_name="merge-harness")
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(BAD_RUNS))
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_bad_run_input_is_one_line_exit_2_and_creates_nothing(
    case, dry_run, tiny_zoo, qwen_model, tmp_path, monkeypatch, capsys
):
    methods, fields, message = BAD_RUNS[case]
    weights = tiny_zoo["ft1"] / "model.safetensors"
    fields = {k: v.format(tmp=tmp_path, qwen=qwen_model, weights=weights) for k, v in fields.items()}
    path = experiment_yaml(tmp_path / "e.yaml", tiny_zoo, methods, **fields)
    monkeypatch.chdir(tmp_path)  # the default store would land here
    before = tree_hashes(tmp_path)
    inputs = tree_hashes(tiny_zoo["base"].parent)
    code, stderr = run_in_process(["run", str(path), "--quiet", *(["--dry-run"] if dry_run else [])], capsys)
    assert code == 2, stderr
    line = one_error_line(stderr)
    assert re.search(message, line), line
    assert tree_hashes(tmp_path) == before  # no store.sqlite, no .merge-harness/, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.yaml"]
    assert tree_hashes(tiny_zoo["base"].parent) == inputs


def test_the_real_cli_refuses_a_mixed_architecture_grid_before_any_job(tiny_zoo, qwen_model, tmp_path):
    path = experiment_yaml(tmp_path / "e.yaml", tiny_zoo, GRID, qa=str(qwen_model))
    result = cli("run", str(path), "--quiet")
    assert result.returncode == 2
    assert "Qwen2ForCausalLM differs from LlamaForCausalLM" in one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.yaml"]


def test_eval_of_a_file_or_unknown_task_creates_no_store(tiny_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    store = ["--store", str(tmp_path / "s.sqlite")]
    weights = str(tiny_zoo["ft0"] / "model.safetensors")
    code, stderr = run_in_process(["eval", weights, "--tasks", "gsm8k_fixture", *store], capsys)
    assert code == 2 and "is a file, not a model directory" in one_error_line(stderr)
    code, stderr = run_in_process(["eval", str(tiny_zoo["ft0"]), "--tasks", "no_such_task", *store], capsys)
    assert code == 2 and "no_such_task" in one_error_line(stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_nan_merge_parameter_names_the_field_not_a_tensor(zoo, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(merge_yaml(zoo, config).read_text() + "parameters: {lambda: .nan}\n")
    result = cli("merge", str(config), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "parameters.lambda: must be a finite number, got nan" in line
    assert "lm_head" not in line.split("(")[0]
    assert not (tmp_path / "out").exists()


def test_every_validation_error_of_a_config_is_on_the_one_line(tmp_path):
    from merge_harness.core.errors import ConfigError
    from merge_harness.run.experiment import load_experiment

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nbase_model: b\nseed: many\ndevice: [cpu]\ntasks: [toy_qa]\nbogus: 1\n")
    with pytest.raises(ConfigError) as raised:
        load_experiment(path)
    message = str(raised.value)
    assert "\n" not in message and "more)" not in message
    for field, line in (("seed", 3), ("device", 4), ("bogus", 6)):
        assert f"{path}:{line}: {field}:" in message


def test_paths_in_an_experiment_are_relative_to_its_file_store_included(tiny_zoo, tmp_path, monkeypatch):
    from merge_harness.run.experiment import load_experiment

    folder = tmp_path / "exp"
    shutil.copytree(tiny_zoo["base"], folder / "base")
    (folder / "e.yaml").write_text("name: x\nbase_model: base\nfinetunes:\n  qa: {model: base}\n"
                                 "tasks: [toy_qa]\nstore: out/s.sqlite\n")
    monkeypatch.chdir(tmp_path)
    experiment = load_experiment("exp/e.yaml")
    assert (experiment.base_model, experiment.store) == ("exp/base", "exp/out/s.sqlite")
