"""The data-split guard: data used to *select* anything (a merge coefficient, a method) must
never be test data.

`check_selection_data` refuses, with a `ConfigError`, before a single row is read:
- any file under `tasks/fixtures/` (the rows the lm-eval tasks of this repository evaluate on),
  and any file passed in `forbidden` (e.g. a zoo's `test_data`);
- a file whose name has a `test` token (`test.jsonl`, `gsm8k_test.jsonl`, `math-test-v2.json`)
  or that lies in a directory named `test`, `tests` or `testing`;
- an lm-eval task name with a `test` token, or written with an explicit split (`task:test`):
  task names are read through
  `merge_harness.merge.calibration_data.task_examples`, i.e. their train split only;
- a task of this repository whose YAML reads a fixture (`merge_harness.tasks.fixtures.load_fixture`): even
  loading it to look for a train split would read its test rows.

`held_out_part` is the held-out part of a train file (Ilharco et al., 2023: a small fraction
of the training set, seeded), for when fine-tuning left that part out.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from merge_harness.core.errors import ConfigError
from merge_harness.tasks import TASKS_DIR, task_files
from merge_harness.tasks.fixtures import FIXTURES_DIR

TEST_TOKEN = re.compile(r"(?:^|[^a-z0-9])test(?:s|ing)?(?:[^a-z0-9]|$)", re.IGNORECASE)
TEST_DIRS = {"test", "tests", "testing"}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
T = TypeVar("T")


def fixture_tasks(tasks_dir: Path = TASKS_DIR) -> set[str]:
    """Names of the repository's lm-eval tasks that evaluate on a fixture file (YAML text scan)."""
    return {name for name, path in task_files(tasks_dir).items()
            if "load_fixture" in path.read_text(encoding="utf-8")}


def is_file_source(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix in FILE_SUFFIXES or path.exists() or "/" in source


def refusal_reason(source: str | Path, forbidden: Iterable[str | Path] = ()) -> str | None:
    """Why `source` counts as test data, or None when it may be used for selection."""
    text = str(source)
    if is_file_source(text):
        path = Path(text).expanduser().resolve()
        if path.is_relative_to(FIXTURES_DIR.resolve()):
            return f"it is under {FIXTURES_DIR} (the rows the lm-eval tasks evaluate on)"
        if any(path == Path(f).expanduser().resolve() for f in forbidden):
            return "it is one of the evaluation files named as forbidden (e.g. the zoo's test data)"
        if TEST_TOKEN.search(path.name):
            return f"its file name {path.name!r} names a test split"
        if TEST_DIRS & {part.lower() for part in path.parent.parts}:
            return "it lies in a directory named test/tests/testing"
        return None
    name, _, split = text.partition(":")
    if split:
        return f"it names split {split!r}; task names select their train split only (write just {name!r})"
    if TEST_TOKEN.search(name):
        return f"the task name {name!r} names a test split"
    if name in fixture_tasks():
        return f"task {name!r} evaluates on a fixture file under {FIXTURES_DIR} (test rows only)"
    return None


def check_selection_data(sources: Iterable[str | Path], forbidden: Iterable[str | Path] = ()) -> None:
    """Raise ConfigError if any source is (or looks like) test data; reads no file."""
    forbidden = list(forbidden)
    for source in sources:
        reason = refusal_reason(source, forbidden)
        if reason is not None:
            raise ConfigError(
                f"{source}: refusing to select on this data: {reason}. Selection must use a "
                "held-out part of the train split (a train JSONL file, or an lm-eval task name)"
            )


def held_out_part(rows: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(rest, held out): a seeded shuffle, the last ceil(fraction * n) rows held out."""
    if not 0 < fraction < 1:
        raise ConfigError(f"held-out fraction must be in (0, 1), not {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    count = max(1, round(fraction * len(rows)))
    return [rows[i] for i in order[:-count]], [rows[i] for i in order[-count:]]
