"""`merge-harness eval` through the real CLI: the numbers lm-eval itself gives, chat tasks get the
chat template by default, results are reused, and lm-eval's results JSON is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lm_eval
import pytest

from merge_harness.evaluate.evaluator import TaskCatalog
from merge_harness.store.database import ResultStore
from merge_harness.tasks import TASKS_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TASKS = ["toy_qa", "toy_math"]  # a log-likelihood and a generation chat task


def harness_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "merge_harness", "--threads", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)


def test_toy_tasks_declare_the_chat_template():
    catalog = TaskCatalog(include_defaults=False)
    assert all(catalog.declares_chat_template(t) for t in [*TASKS, "toy_code", "gsm8k_chat_fixture"])
    assert not catalog.declares_chat_template("gsm8k_fixture")


def test_eval_equals_lm_evals_own_result_on_a_chat_finetune(ci_zoo, tmp_path):
    """The demo zoo's math fine-tune (size ci), as `lm_eval --apply_chat_template` scores it."""
    model = str(ci_zoo[0].finetunes["math"])
    out = tmp_path / "lm-eval-out"
    ours = harness_cli(
        "eval", model, "--tasks", ",".join(TASKS), "--limit", "20", "--gen-kwargs", "max_gen_toks=16",
        "--batch-size", "4", "--log-samples", "--output-path", str(out),
        "--store", str(tmp_path / "s.sqlite"), "--quiet",
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr
    assert "2 computed, 0 reused" in ours.stdout
    (written,) = out.glob("*/results_*.json")
    payload = json.loads(written.read_text())
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model},dtype=float32",
        tasks=TASKS,
        task_manager=TaskCatalog([TASKS_DIR], include_defaults=False).manager,
        apply_chat_template=True,  # what the chat tasks get by default from `eval`
        limit=20,
        gen_kwargs="max_gen_toks=16",
        batch_size=4,
        device="cpu",
        random_seed=1234,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    for task in TASKS:
        assert payload["results"][task] == reference["results"][task], task
        assert payload["n-samples"][task]["effective"] == reference["n-samples"][task]["effective"]
        assert payload["versions"][task] == reference["versions"][task]
    with ResultStore(tmp_path / "s.sqlite") as store:
        samples = store.get_result(payload["config"]["job_keys"]["toy_math"]).samples_log
    assert samples[0]["prompt"].startswith("<s>A chat between")  # the template, by default
    assert payload["results"]["toy_qa"]["acc,none"] > 0.25  # a trained model, not a random one


def test_eval_warns_when_a_chat_task_runs_without_the_template_and_reuses_results(chat_zoo, tmp_path):
    args = ["eval", str(chat_zoo["qa"]), "--tasks", "toy_qa", "--limit", "2", "--no-apply-chat-template",
            "--store", str(tmp_path / "s.sqlite"), "--quiet"]  # fmt: skip
    first = harness_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "warning: task 'toy_qa' is a chat task" in " ".join(first.stderr.split())
    assert "1 computed, 0 reused; results stored in" in first.stdout
    again = harness_cli(*args)
    assert again.returncode == 0 and "0 computed, 1 reused; results reused from" in again.stdout
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert [job["status"] for job in store.jobs("eval")] == ["done"]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--batch-size", "big"], "--batch-size: expected a positive integer, 'auto' or 'auto:N'"),
        (["--gen-kwargs", "{not json"], "--gen-kwargs: invalid JSON"),
        (["--limit", "2.5"], "--limit: 2.5 is neither a count"),
    ],
)
def test_bad_eval_options_are_one_line_errors(flag, message, tmp_path):
    result = harness_cli("eval", str(tmp_path), "--tasks", "toy_qa", *flag, "--store", str(tmp_path / "s"))
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
