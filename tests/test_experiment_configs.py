"""The shipped paper-scale experiment configs validate with `merge-harness run --dry-run`.

Their weights (Llama-2-7B/13B, Qwen-2-0.5B, Llama-3.2-3B and fine-tunes) are not on this machine,
so the dry run validates everything else: schema, methods, every parameter, task names.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


def test_there_are_paper_configs():
    names = {path.stem for path in EXPERIMENTS}
    assert {"slta_llama2_7b", "slta_llama2_13b", "slta_qwen2_0.5b", "mergebench_llama3.2_3b"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_dry_run_validates(path, tmp_path):
    from typer.testing import CliRunner

    from merge_harness.cli.app import app

    # in-process, so lm-eval's task index is built once for all configs
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--store", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 0, result.output[-2000:]
    assert "valid;" in result.output and "jobs in" in result.output


def test_dry_run_catches_a_bad_parameter(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXPERIMENTS[0].read_text().replace("density: 0.5", "density: 1.5", 1))
    command = [
        sys.executable,
        "-m",
        "merge_harness",
        "run",
        str(bad),
        "--dry-run",
        "--store",
        str(tmp_path / "s.sqlite"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "density" in result.stderr
