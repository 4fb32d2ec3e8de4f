"""No result from a broken model: NaN/inf weights fail before evaluation, naming file and tensor,
and the jobs that would read them are marked failed, never done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_harness.core.errors import CheckpointError
from merge_harness.io.checkpoint import Checkpoint
from merge_harness.run.experiment import load_experiment
from merge_harness.run.runner import check_finite_weights, run_experiment
from merge_harness.store.database import ResultStore
from tests.conftest import write_experiment

BROKEN_TENSOR = "model.layers.1.mlp.up_proj.weight"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def broken_copy(source, target, value=float("nan")):
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    state[BROKEN_TENSOR][0, 0] = value
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture
def broken(chat_zoo, tmp_path):
    return broken_copy(chat_zoo["math"], tmp_path / "broken_math")


def statuses(store: ResultStore, experiment: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for job in store.jobs(experiment):
        found.setdefault(job["label"], set()).add(job["status"])
    return found


@pytest.mark.parametrize("which", ["base", "math"])
def test_run_with_a_broken_model_fails_before_any_evaluation(which, chat_zoo, tmp_path):
    zoo = {**chat_zoo, which: broken_copy(chat_zoo[which], tmp_path / f"broken_{which}")}
    methods = "  - method: task_arithmetic\n    parameters: {lambda: 0.5}\n"
    experiment = load_experiment(write_experiment(tmp_path / "e.yaml", zoo, tmp_path / "s.sqlite", methods))
    with ResultStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(
            CheckpointError, match=rf"broken_{which}/model.safetensors: tensor '{BROKEN_TENSOR}'"
        ):
            run_experiment(experiment, store, show_progress=False)
        found = statuses(store, experiment.name)
    label = "pre-trained" if which == "base" else "math"
    assert found[label] == {"failed"} and found["task_arithmetic"] == {"failed"}
    assert all("done" not in status for status in found.values())  # no baseline score of a broken model


def test_eval_of_a_broken_model_exits_2_and_marks_the_job_failed(broken, tmp_path):
    command = [sys.executable, "-m", "merge_harness", "eval", str(broken), "--tasks", "toy_qa",
               "--limit", "2",
               "--store", str(tmp_path / "s.sqlite"), "--quiet"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"error: {broken}/model.safetensors: tensor '{BROKEN_TENSOR}' contains NaN or inf" in line
    with ResultStore(tmp_path / "s.sqlite") as store:
        (job,) = store.jobs("eval")
    assert job["status"] == "failed" and BROKEN_TENSOR in job["error"]


def test_the_check_reads_each_file_once_per_content(chat_zoo, tmp_path, monkeypatch):
    with ResultStore(tmp_path / "s.sqlite") as store:
        check_finite_weights(chat_zoo["qa"], store)
        monkeypatch.setattr(Checkpoint, "read", lambda self, name: pytest.fail("read again"))
        check_finite_weights(chat_zoo["qa"], store)  # known finite by its hash: nothing read
        monkeypatch.undo()
        inf = broken_copy(chat_zoo["qa"], tmp_path / "inf", value=float("inf"))
        with pytest.raises(CheckpointError, match="contains NaN or inf"):
            check_finite_weights(inf, store)  # new content, a new check
    assert torch.isinf(load_file(inf / "model.safetensors")[BROKEN_TENSOR]).any()
