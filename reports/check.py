"""Regression check: compare an experiment's results to a golden file, with tolerances.

Golden file (JSON, written by `write_golden`, the `--update` path): the experiment name, the
harness and lm-eval versions the results came from, and per (label, task, metric) the value and
stderr in lm-eval's own units.

Tolerances are in *points*, the scale every report uses: a 0-1 metric (acc, exact_match, pass@k,
f1) counts 1 point per 0.01 (a percentage point), BLEU and chrF count their own 0-100 units. So
`points=0.5` allows 0.005 of accuracy or 0.5 BLEU. Per metric: `per_metric={"bleu": 1.0}` (a
metric name, or "task:metric" for one task). Noise-aware: with `stderr_multiple=k` a difference
is also allowed up to k standard errors of the difference, k * sqrt(se_golden^2 + se_now^2)
(in points; the larger of the two allowances wins; without a recorded stderr only points apply).

Verdicts: "pass"; "regressed" (worse than the golden beyond the allowance: fails); "missing" (in
the golden file but not measured: fails, never a silent pass); "improved" (better beyond the
allowance: passes, but says so: update the golden); "new" (measured, not in the golden: reported).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from merge_harness.core.atomic import atomic_write_text
from merge_harness.core.errors import ConfigError
from merge_harness.reports import metrics as m

GOLDEN_FORMAT = "merge-harness-golden/1"
FAILING = ("regressed", "missing")


@dataclass(frozen=True)
class Tolerance:
    points: float = 0.5
    stderr_multiple: float | None = None
    per_metric: Mapping[str, float] = field(default_factory=dict)

    def allowed(self, task: str, metric: str, stderr_points: float | None) -> float:
        points = self.per_metric.get(f"{task}:{metric}", self.per_metric.get(metric, self.points))
        if self.stderr_multiple is not None and stderr_points is not None:
            return max(points, self.stderr_multiple * stderr_points)
        return points

    def describe(self) -> str:
        text = f"{self.points:g} points"
        if self.per_metric:
            text += " (" + ", ".join(f"{k}: {v:g}" for k, v in sorted(self.per_metric.items())) + ")"
        if self.stderr_multiple is not None:
            text += f", or {self.stderr_multiple:g} x the stderr of the difference if larger"
        return text


@dataclass(frozen=True)
class Verdict:
    label: str
    task: str
    metric: str
    status: str  # pass | regressed | improved | missing | new
    golden: float | None
    measured: float | None
    diff_points: float | None
    allowed_points: float | None

    @property
    def message(self) -> str:
        where = f"{self.label} / {self.task} / {self.metric}"
        if self.status == "missing":
            return f"{where}: in the golden file but not measured"
        if self.status == "new":
            return f"{where}: measured {self.measured:.6g}, not in the golden file"
        return (f"{where}: {self.status}, {self.golden:.6g} -> {self.measured:.6g} "
                f"({self.diff_points:+.3f} points, allowed {self.allowed_points:.3f})")


@dataclass
class CheckResult:
    experiment: str
    tolerance: Tolerance
    verdicts: list[Verdict]

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status in FAILING]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def count(self, status: str) -> int:
        return sum(v.status == status for v in self.verdicts)


# -------------------------------------------------------------------------------- golden files


def _number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def golden_data(frame: pd.DataFrame, experiment: str) -> dict[str, Any]:
    """The golden file's content for `experiment`'s rows of a results frame."""
    rows = frame[frame["experiment"] == experiment]
    versions: dict[str, set[str]] = {}
    for spec_json in rows["spec_json"].unique():
        for package, version in (json.loads(spec_json).get("versions") or {}).items():
            versions.setdefault(package, set()).add(str(version))
    results = [{"label": r.label, "task": r.task, "metric": r.metric, "value": float(r.value),
                "stderr": _number(r.stderr), "key": r.key}
               for r in rows.sort_values(["label", "task", "metric"]).itertuples()]
    return {"format": GOLDEN_FORMAT, "experiment": experiment,
            "versions": {k: sorted(v) for k, v in sorted(versions.items())}, "results": results}


def write_golden(frame: pd.DataFrame, path: Path, experiment: str) -> Path:
    """Record `experiment`'s results as the golden file `path` (atomically)."""
    data = golden_data(frame, experiment)
    if not data["results"]:
        raise ConfigError(f"experiment {experiment!r} has no results to record in {path}")
    return atomic_write_text(Path(path), json.dumps(data, indent=1, allow_nan=False) + "\n")


def load_golden(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"golden file {path} does not exist; record one with "
                          f"`merge-harness check --golden {path} --update`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"golden file {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != GOLDEN_FORMAT:
        raise ConfigError(f"{path} is not a merge-harness golden file (expected \"format\": "
                          f"\"{GOLDEN_FORMAT}\"); record one with --update")
    rows = data.get("results")
    fields = {"label", "task", "metric", "value"}
    if not isinstance(data.get("experiment"), str) or not isinstance(rows, list) or not all(
            isinstance(r, dict) and fields <= r.keys() for r in rows):
        raise ConfigError(f"{path}: a golden file needs \"experiment\" and \"results\" rows with "
                          f"{sorted(fields)}; record it again with --update")
    return data


# ------------------------------------------------------------------------------------ checking


def _verdict(row: Mapping[str, Any], now: pd.Series | None, tolerance: Tolerance) -> Verdict:
    label, task, metric = row["label"], row["task"], row["metric"]
    if now is None:
        return Verdict(label, task, metric, "missing", row["value"], None, None, None)
    scale = m.points_per_unit(metric)
    diff = (float(now["value"]) - row["value"]) * scale
    errors = [_number(row.get("stderr")), _number(now["stderr"])]
    known = [e for e in errors if e is not None]
    stderr = math.sqrt(sum(e * e for e in known)) * scale if known else None
    allowed = tolerance.allowed(task, metric, stderr)
    signed = diff if m.higher_is_better(metric) else -diff
    status = ("pass" if abs(diff) <= allowed + 1e-9 else "improved" if signed > 0 else "regressed")
    return Verdict(label, task, metric, status, row["value"], float(now["value"]), diff, allowed)


def is_primary(task: str, metric: str) -> bool:
    """Whether `metric` is the primary metric `task` declares (`merge_harness.tasks`)."""
    return m.primary_metric(task, [metric]) == metric


def check(frame: pd.DataFrame, golden: Mapping[str, Any], tolerance: Tolerance = Tolerance(),
          primary_only: bool = False) -> CheckResult:
    """Verdicts for every golden row (and every measured row the golden file lacks); with
    `primary_only`, for each task's primary metric only (the number every table reports)."""
    if primary_only:
        golden = {**golden, "results": [r for r in golden["results"] if is_primary(r["task"], r["metric"])]}
        if not frame.empty:
            frame = frame[[is_primary(t, mt) for t, mt in zip(frame["task"], frame["metric"])]]
    experiment = golden["experiment"]
    present = sorted(frame["experiment"].unique()) if not frame.empty else []
    if present and present != [experiment]:
        raise ConfigError(f"the golden file was recorded for experiment {experiment!r}, but the "
                          f"results are of {present}; check {experiment!r} (--experiment "
                          f"{experiment}) or record a golden file for {present[0]!r} with --update")
    measured = {(r["label"], r["task"], r["metric"]): r for _, r in frame.iterrows()}
    verdicts, seen = [], set()
    for row in golden["results"]:
        ident = (row["label"], row["task"], row["metric"])
        seen.add(ident)
        verdicts.append(_verdict(row, measured.get(ident), tolerance))
    for ident in sorted(set(measured) - seen):
        verdicts.append(Verdict(*ident, "new", None, float(measured[ident]["value"]), None, None))
    return CheckResult(experiment, tolerance, verdicts)


# ------------------------------------------------------------------------------------ writers


def _fmt(value: float | None, spec: str = ".6g") -> str:
    return "–" if value is None else format(value, spec)


def summary_markdown(result: CheckResult, golden_name: str = "the golden file") -> str:
    verdict = "FAILED" if result.exit_code else "passed"
    counts = ", ".join(f"{result.count(s)} {s}" for s in
                       ("pass", "regressed", "missing", "improved", "new") if result.count(s))
    lines = [f"# Regression check of `{result.experiment}`: {verdict}", "",
             f"{len(result.verdicts)} checks against {golden_name}: {counts}. "
             f"Tolerance: {result.tolerance.describe()} (points: 0-1 metrics x 100, BLEU/chrF as is).",
             ""]
    header = ["| status | model | task | metric | golden | measured | Δ (points) | allowed |",
              "|:--|:--|:--|:--|--:|--:|--:|--:|"]

    def line(v: Verdict) -> str:
        status = f"**{v.status}**" if v.status in FAILING else v.status
        metric = f"`{v.metric}`" + (" (primary)" if is_primary(v.task, v.metric) else "")
        return (f"| {status} | {v.label} | {v.task} | {metric} | {_fmt(v.golden)} | "
                f"{_fmt(v.measured)} | {_fmt(v.diff_points, '+.3f')} | {_fmt(v.allowed_points, '.3f')} |")

    if result.failed:
        lines += ["## Failures", "", *[f"- {v.message}" for v in result.failed], ""]
    notable = [v for v in result.verdicts if v.status != "pass"]
    if notable:
        lines += ["## Not passing as recorded", "", *header, *map(line, notable), ""]
    lines += ["<details><summary>All checks</summary>", "", *header,
              *map(line, result.verdicts), "", "</details>"]
    return "\n".join(lines) + "\n"


def junit_xml(result: CheckResult, suite_name: str = "merge-harness check") -> str:
    """JUnit XML: one testcase per golden row (failure = regressed or missing; new = skipped)."""
    import xml.etree.ElementTree as ET

    cases = len(result.verdicts)
    failures, skipped = len(result.failed), result.count("new")
    attrs = {"tests": str(cases), "failures": str(failures), "errors": "0", "time": "0"}
    root = ET.Element("testsuites", {"name": suite_name, **attrs})
    suite = ET.SubElement(root, "testsuite", {"name": f"{suite_name}: {result.experiment}",
                                              **attrs, "skipped": str(skipped)})
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "tolerance", "value": result.tolerance.describe()})
    for v in result.verdicts:
        case = ET.SubElement(suite, "testcase", {"name": f"{v.task} / {v.metric}",
                                                 "classname": f"{result.experiment}.{v.label}",
                                                 "time": "0"})
        if v.status in FAILING:
            failure = ET.SubElement(case, "failure", {"message": v.message, "type": v.status})
            failure.text = v.message
        elif v.status == "new":
            ET.SubElement(case, "skipped", {"message": v.message})
        elif v.status == "improved":
            ET.SubElement(case, "system-out").text = v.message + " (update the golden file)"
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
