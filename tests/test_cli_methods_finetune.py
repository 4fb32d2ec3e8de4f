"""`merge-harness methods --format`, `finetune` (its progress bar, --quiet) and `analyze search
--grid`, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merge_harness.cli.app import describe_params, methods_markdown
from merge_harness.merge.methods import method_registry
from tests.calibrated_zoo import make_zoo
from tests.test_bad_input import cli, one_error_line
from tests.test_cli_analyze import analyze, experiment_yaml

# ----------------------------------------------------------------------------------------- methods


def test_methods_json_has_every_method_with_its_parameters_and_defaults():
    result = cli("methods", "--format", "json")
    assert result.returncode == 0, result.stderr
    methods = {m["name"]: m for m in json.loads(result.stdout)}
    assert list(methods) == [name for name, _ in method_registry().items()]
    for name, method in method_registry().items():
        entry = methods[name]
        assert (entry["kind"], entry["paper"], entry["equation"], entry["description"]) == (
            "per tensor" if method.streaming else "calibrated", method.paper, method.equation,
            method.description)
    ties = methods["ties"]
    assert {p["name"]: p["default"] for p in ties["parameters"]}["lambda"] == 1.0
    density = next(p for p in ties["per_model_parameters"] if p["name"] == "density")
    assert density == {"name": "density", "required": False, "default": 1.0, "type": "number",
                       "description": "fraction of tau_t entries kept", "exclusiveMinimum": 0, "maximum": 1}
    [t] = methods["slerp"]["parameters"]
    assert (t["name"], t["required"], t["default"]) == ("t", True, None)
    assert methods["slta"]["per_model_parameters"] == []


def test_methods_markdown_alias_and_format_print_the_docs_table():
    alias, chosen = cli("methods", "--markdown"), cli("methods", "--format", "markdown")
    assert alias.returncode == chosen.returncode == 0
    assert alias.stdout == chosen.stdout == methods_markdown()


def test_a_piped_methods_table_folds_no_value():
    result = cli("methods")  # stdout is a pipe here
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, method in method_registry().items():
        [row] = [line for line in lines if line.startswith(f"│ {name} ")]
        assert describe_params(method.params) in row and method.description in row


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "yaml"], "error: --format: 'yaml' is not one of table, json, markdown"),
    (["--markdown", "--format", "json"], "error: --markdown and --format json disagree: give one"),
])
def test_bad_methods_format_is_one_line_exit_2(args, message):
    result = cli("methods", *args)
    assert result.returncode == 2 and one_error_line(result.stderr) == message


# ---------------------------------------------------------------------------------------- finetune


@pytest.fixture
def finetune_config(chat_zoo, tmp_path) -> Path:
    rows = [{"prompt": f"Question: what is {a} plus 1? Answer:", "response": f" #### {a + 1}"}
            for a in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "ft.yaml"
    config.write_text(f"base_model: {chat_zoo['base']}\ndata: train.jsonl\noutput_dir: out/math\n"
                      "max_steps: 3\nbatch_size: 4\nlr: 0.001\nschedule: constant\nwarmup_steps: 0\n"
                      "template: plain\ndevice: cpu\n")
    return config


def finetune_on_a_terminal(*args: str) -> subprocess.CompletedProcess:
    """`merge-harness finetune` with stderr taken for a terminal (rich draws its bar there)."""
    env = {**os.environ, "TTY_COMPATIBLE": "1", "TERM": "xterm", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "merge_harness", "finetune", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_the_finetune_bar_shows_loss_and_learning_rate_and_quiet_hides_it(finetune_config, tmp_path):
    shown = finetune_on_a_terminal(str(finetune_config))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("written:")
    losses = json.loads((tmp_path / "out" / "math" / "finetune.json").read_text())["losses"]
    assert "3/3" in shown.stderr and f"loss {losses[-1]:.4f}  lr 1.00e-03" in shown.stderr
    quiet = finetune_on_a_terminal(str(finetune_config), "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert "fine-tuning" not in quiet.stderr and "loss" not in quiet.stderr


# ---------------------------------------------------------------------------------- analyze search


@pytest.mark.parametrize(("method", "parameter", "grid", "message"), [
    ("ties", "density", "0.5,1.5,2", "--grid: density = 1.5 is not valid for ties: input should be less than "
                                     "or equal to 1"),
    ("ties", "density", "0,0.5", "--grid: density = 0 is not valid for ties: input should be greater than 0"),
    ("slta", "num_samples", "8,8.5", "--grid: num_samples = 8.5 is not valid for slta: input should be a "
                                     "valid integer, got a number with a fractional part"),
    ("task_arithmetic", "lambda", "0,x", "--grid: 'x' is not a number (e.g. --grid 0,0.25,0.5)"),
    ("task_arithmetic", "lambda", "0,inf", "--grid: 'inf' is not a finite number"),
    ("ties", "dens", "0.5", "ties has no parameter 'dens' to search (its parameters: lambda, normalize,"),
])
def test_a_bad_search_grid_is_one_line_exit_2_before_anything_runs(tmp_path, method, parameter, grid,
                                                                   message):
    result = analyze("search", str(tmp_path / "absent.yaml"), "--method", method, "--parameter", parameter,
                     "--grid", grid, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_the_default_grid_is_checked_too(tmp_path):
    result = analyze("search", str(tmp_path / "absent.yaml"), "--method", "ties", "--parameter", "density")
    assert result.returncode == 2
    assert "the default grid (0 to 1): density = 0 is not valid for ties" in one_error_line(result.stderr)


def test_a_choice_on_the_grid_edge_warns_that_the_best_may_lie_outside(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", tasks=("math", "qa"))
    config = experiment_yaml(zoo, tmp_path / "e.yaml")
    out = tmp_path / "out"
    result = analyze("search", config, "--grid", "0.5,0.25", "--out", str(out), "--template", "plain")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "search.json").read_text())
    assert [point["value"] for point in record["curve"]] == [0.25, 0.5]
    side, direction = ("smallest", "below") if record["chosen"] == 0.25 else ("largest", "above")
    assert (f"warning: chosen lambda = {record['chosen']:g} is the grid's {side} value: the best may lie "
            f"{direction} it; widen the grid (--grid)") in result.stderr
