"""HumanEval through the real lm-eval with an `LM` whose answers we know, so the score is known:
canonical solutions must score pass@1 = 1.0, bodies that exit with status 0 must score 0, and a
sample the sandbox could not run is counted and left out, never scored as failed."""

from __future__ import annotations

import pytest
from lm_eval.api.model import LM

from merge_harness.evaluate.evaluator import EvalSettings, _run_task, local_catalog, parse_scores
from merge_harness.tasks import sandbox
from merge_harness.tasks.fixtures import read_fixture

TASK = "humaneval_sandboxed_fixture"
PROBLEMS = read_fixture("humaneval.jsonl")


class CannedLM(LM):
    """lm-eval's model interface, answering each HumanEval prompt from a table (no model)."""

    def __init__(self, answer: dict[str, str]) -> None:
        super().__init__()
        self.answer = answer  # prompt (stripped) -> completion

    def loglikelihood(self, requests):
        raise NotImplementedError("HumanEval only generates")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("HumanEval only generates")

    def generate_until(self, requests):
        return [self.answer[request.args[0].strip()] for request in requests]


def scores(answer) -> dict[str, float]:
    """Every problem of the fixture answered by `answer(problem)`, scored by lm-eval."""
    lm = CannedLM({p["prompt"].strip(): answer(p) for p in PROBLEMS})
    results = _run_task(lm, TASK, EvalSettings(), local_catalog())
    found = {s.metric: s for s in parse_scores(results) if s.task == TASK}
    assert {s.samples for s in found.values()} == {len(PROBLEMS)}
    return {metric: score.value for metric, score in found.items()}


def test_canonical_solutions_score_one():
    expected = {"pass@1": 1.0, "sandbox_errors": 0.0, "timeouts": 0.0}
    assert scores(lambda p: p["canonical_solution"]) == expected


@pytest.mark.parametrize(
    "body", ["    exit(0)\n", "    import os\n    os._exit(0)\n", "    raise SystemExit(0)\n"],
    ids=["exit(0)", "os._exit(0)", "raise SystemExit(0)"],
)
def test_bodies_that_exit_with_status_0_score_zero(body):
    assert scores(lambda p: body) == {"pass@1": 0.0, "sandbox_errors": 0.0, "timeouts": 0.0}


def test_a_sample_the_sandbox_cannot_run_is_counted_and_left_out(monkeypatch):
    broken = PROBLEMS[0]["entry_point"]
    real = sandbox._run_once

    def run_once(source, limits):
        if f"check({broken})" in source:  # this problem's sandbox never starts
            return sandbox.ExecutionResult(False, "error", None, "", "no sandbox today", 0.0)
        return real(source, limits)

    monkeypatch.setattr(sandbox, "_run_once", run_once)
    found = scores(lambda p: p["canonical_solution"])
    assert found == {"pass@1": 1.0, "sandbox_errors": 1.0, "timeouts": 0.0}  # 5 of the 5 that ran
