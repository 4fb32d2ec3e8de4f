"""The SLTA study's three tasks, shaped like the paper's Math / Code / Translate (issue 18).

Dai et al. (ICLR 2025) fine-tune on GSM8K, Code Alpaca and zh->en, and test on GSM8K, HumanEval
and zh->en. The study's synthetic versions share the toy world of `merge_harness.zoo.toytasks`
(names, objects, the numbers 1-9), so their fine-tunes conflict, and differ from the toy suite
where the paper's setting asks for it:

- **math**, shaped like GSM8K: a word problem -> "5 + 3 = 8\\n#### 8", strict "#### N" match;
- **code**, shaped like Code Alpaca (train) and HumanEval (test): "Write a Python function
  f(a, b) that returns ..." -> the whole function, run against its unit tests in the sandbox;
- **translate**, shaped like zh -> en (ALMA's prompt): a Toy sentence -> its English, sacreBLEU.

The test rows are `tasks/fixtures/study_<task>.jsonl` (`STUDY_TEST_ROWS` each, seed
`STUDY_FIXTURE_SEED`, read by the lm-eval tasks `study_<task>` in `tasks/study/`); `train_pairs`
never draws a test prompt of this suite or of the toy suite.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from merge_harness.tasks.fixtures import FIXTURES_DIR
from merge_harness.zoo import toytasks

TASKS = ("math", "code", "translate")
LMEVAL_TASKS = {task: f"study_{task}" for task in TASKS}
STUDY_FIXTURE_SEED = 20261201
STUDY_TEST_ROWS = 100


def instruction(row: dict) -> str:
    """A Code-Alpaca-style instruction for a toy HumanEval row: 'Write a Python function
    total_pens(a, b) that returns the sum of a and b.' (every toy docstring is 'Return ...')."""
    signature = row["prompt"].split("def ", 1)[1].split(":", 1)[0]
    doc = row["prompt"].split('"""')[1]
    return f"Write a Python function {signature} that returns {doc.removeprefix('Return ')}"


def code_row(rng: random.Random) -> dict:
    """A HumanEval-schema row whose `prompt` is empty: the answer is the whole function, so the
    sandbox's `prompt + completion + test` runs the completion alone against the tests."""
    row = toytasks.code_row(rng)
    function = row["prompt"].split("\n", 1)[0] + "\n" + row["canonical_solution"]
    return {**row, "instruction": instruction(row), "prompt": "", "canonical_solution": function}


GENERATORS = {"math": toytasks.math_row, "code": code_row, "translate": toytasks.translate_row}


def as_pair(task: str, row: dict) -> dict[str, str]:
    """The (prompt, response) a fine-tune learns from `row`; the user turn the task YAML shows."""
    if task == "code":
        return {"prompt": row["instruction"], "response": row["canonical_solution"].rstrip("\n")}
    return toytasks.as_pair(task, row)


def unique_rows(task: str, rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`count` rows with distinct prompts, none in `exclude`."""
    return toytasks.unique_rows(task, rng, count, exclude, GENERATORS[task], as_pair)


def fixture_rows(task: str) -> list[dict]:
    return unique_rows(task, random.Random(f"{STUDY_FIXTURE_SEED}-{task}"), STUDY_TEST_ROWS)


def fixture_path(task: str) -> Path:
    return FIXTURES_DIR / f"{LMEVAL_TASKS[task]}.jsonl"


def read_test_rows(task: str) -> list[dict]:
    """The committed test rows; regenerated in memory when the file is missing."""
    path = fixture_path(task)
    if not path.is_file():
        return fixture_rows(task)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_pairs(task: str, count: int, seed: int, stream: str = "train") -> list[dict[str, str]]:
    """Fine-tuning / calibration / held-out pairs, disjoint from both suites' test prompts."""
    exclude = {as_pair(task, row)["prompt"] for row in read_test_rows(task)}
    exclude |= {toytasks.as_pair(task, row)["prompt"] for row in toytasks.read_test_rows(task)}
    rows = unique_rows(task, random.Random(f"{seed}-study-{task}-{stream}"), count, exclude)
    return [as_pair(task, row) for row in rows]


def write_fixtures() -> list[Path]:
    """(Re)write `tasks/fixtures/study_*.jsonl`; a pure function of STUDY_FIXTURE_SEED."""
    paths = []
    for task in TASKS:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in fixture_rows(task))
        fixture_path(task).write_text(text, encoding="utf-8")
        paths.append(fixture_path(task))
    return paths


if __name__ == "__main__":  # python -m merge_harness.zoo.studytasks: refresh the committed fixtures
    for written in write_fixtures():
        print(written)
