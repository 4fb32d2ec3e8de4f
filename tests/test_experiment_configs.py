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
# built here by `merge-harness study zoo` (local paths, absent on a fresh clone): validated by
# reference below, and run end to end on the ci zoo by tests/test_slta_study.py
LOCAL_ZOO = {"slta_study"}
HUB_WEIGHTS = [path for path in EXPERIMENTS if path.stem not in LOCAL_ZOO]


def test_there_are_paper_configs():
    names = {path.stem for path in EXPERIMENTS}
    assert {"slta_llama2_7b", "slta_llama2_13b", "slta_qwen2_0.5b", "mergebench_llama3.2_3b"} <= names


@pytest.mark.parametrize("path", HUB_WEIGHTS, ids=[p.stem for p in HUB_WEIGHTS])
def test_dry_run_validates(path, tmp_path):
    from typer.testing import CliRunner

    from merge_harness.cli.app import app

    # in-process, so lm-eval's task index is built once for all configs
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--store", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 0, result.output[-2000:]
    assert "valid;" in result.output and "jobs in" in result.output


@pytest.mark.parametrize("stem", sorted(LOCAL_ZOO))
def test_local_zoo_configs_plan_every_replicate_by_reference(stem):
    from merge_harness.run.experiment import load_experiments, plan_jobs

    experiments = load_experiments(Path(__file__).parents[1] / "experiments" / f"{stem}.yaml")
    assert len(experiments) == 3 and len({e.name for e in experiments}) == 3
    for experiment in experiments:
        jobs = plan_jobs(experiment, None, identify=False)
        assert len(jobs) >= 20 and all(len(job.tasks) == 3 for job in jobs)


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
