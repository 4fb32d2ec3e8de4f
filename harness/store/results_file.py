"""The results JSONL file that pools results between machines: one whole `JobResult` per line,
as `ResultStore.export_jsonl` writes it; reading and checking it, and what an import did."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merge_harness.core.errors import StoreError
from merge_harness.core.results import Coefficient, JobResult, Score


@dataclass(frozen=True)
class ResultsFile:
    """A results JSONL file as read and checked by `read_results_jsonl`: (line number, result)."""

    path: Path
    lines: tuple[tuple[int, JobResult], ...]


@dataclass(frozen=True)
class ImportConflict:
    """A line whose key the store already holds with other content (`differ`: what differs)."""

    line: int
    key: str
    label: str
    experiment: str  # of the stored result
    differ: tuple[str, ...]

    def __str__(self) -> str:
        return (f"job {self.key[:12]} ({self.label!r}, experiment {self.experiment!r}) is stored "
                f"with other {', '.join(self.differ)}; the stored result is kept")


@dataclass(frozen=True)
class ImportOutcome:
    """What `import_jsonl` did, line by line: every line is imported, skipped or a conflict."""

    imported: int  # added a job, or an experiment to a stored job
    skipped: int  # already stored, identical
    conflicts: tuple[ImportConflict, ...]


def read_results_jsonl(path: Path | str) -> ResultsFile:
    """Read and check every line of an `export_jsonl` file; the first bad one raises `StoreError`
    naming the file and line (so a caller can refuse the file before opening any store)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read the results file {path}: {exc}") from exc
    parsed = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                parsed.append((lineno, _result_from_json(line)))
            except (ValueError, TypeError) as exc:
                raise StoreError(f"{path}:{lineno}: not a merge-harness job result ({exc}); "
                                 "nothing was imported") from exc
    return ResultsFile(path, tuple(parsed))


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON (write NaN as null)")


def _result_from_json(line: str) -> JobResult:
    data = json.loads(line, parse_constant=_no_constants)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if missing := {"key", "experiment", "model_label", "spec", "scores"} - data.keys():
        raise ValueError(f"missing fields {sorted(missing)}")
    if not all(isinstance(data[n], str) and data[n] for n in ("key", "experiment", "model_label")):
        raise ValueError("key, experiment and model_label must be non-empty strings")
    if not isinstance(data["spec"], dict):
        raise ValueError("spec must be an object")
    scores = [Score(**s) for s in data["scores"]]
    coefficients = [Coefficient(**c) for c in data.get("coefficients") or []]
    for item in [*scores, *coefficients]:
        if isinstance(item.value, bool) or not isinstance(item.value, (int, float)):
            raise ValueError(f"value {item.value!r} is not a number")
    return JobResult(**{**data, "scores": scores, "coefficients": coefficients})
