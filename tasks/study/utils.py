"""Scoring of the SLTA study's Code task: the completion is a whole function (the row's prompt is
empty), run against the row's tests by humaneval_sandboxed's own code."""

from __future__ import annotations

import re
from collections.abc import Sequence

from merge_harness.tasks.humaneval_sandboxed.utils import completions, scores

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def unfenced(completion: str) -> str:
    """The code of the first Markdown code block, else the completion as it is."""
    found = FENCE.search(completion)
    return found.group(1) if found else completion


def instruction_pass_at_1(doc: dict, results: Sequence[str | Sequence[str]]) -> dict[str, float]:
    return scores(doc, [[unfenced(sample) for sample in completions(results)]], ks=(1,))
