"""The result store: each job's scores, merge coefficients, timings and versions in one SQLite file.

- A job is keyed by a content hash (`content_key`) of everything that determines its result; a
  finished key is never recomputed. Recording it again with identical content (label, spec, scores,
  coefficients) is a no-op; different content is an error unless `replace=True`. Provenance
  (timings, versions, peak RSS, per-sample log) of the first recording is kept.
- A job may serve several experiments (`experiment_jobs`); `jobs.experiment` is the one that
  produced it. A runner that reuses a finished key in another experiment calls `attach`.
- WAL journal, foreign keys on; each write is one `BEGIN IMMEDIATE` transaction, so a killed run
  leaves no partial job, and a second writer waits `timeout_s` and then fails with a `StoreError`.
- Several runners may share one store (one machine, local disk): `merge_harness.store.claims` keeps their
  claims on jobs in the same file, so each job is computed once.
- Leaderboards are queries (`results_frame`), never stored copies. Schema: `store_migrations.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_harness.core.atomic import atomic_write_text
from merge_harness.core.errors import HarnessError, StoreError
from merge_harness.core.results import Coefficient, JobResult, Score
from merge_harness.store.migrations import migrate
from merge_harness.store.results_file import (
    ImportConflict,
    ImportOutcome,
    ResultsFile,
    read_results_jsonl,
)

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_STORE_PATH = Path(".merge-harness/results.sqlite")
RESULT_COLUMNS = ["key", "experiment", "label", "method", "task", "metric", "value", "stderr",
                  "samples", "peak_rss_mb", "spec_json"]  # then param_* and time_* columns


def canonical_json(obj: Any, what: str = "job spec") -> str:
    """Sorted keys, no spaces, floats by repr; NaN and infinity are refused (they are not JSON)."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"cannot serialise the {what} as JSON: {exc} (only dicts, lists, str, int, finite "
            "float, bool and null are allowed; write NaN as null)"
        ) from exc


def content_key(spec: Mapping[str, Any]) -> str:
    """The sha256 hex digest of the canonical JSON of `spec`: the same for any key order."""
    return hashlib.sha256(canonical_json(dict(spec)).encode("utf-8")).hexdigest()


def utc_now() -> str:
    """The time as the store writes it (ISO 8601, UTC, milliseconds): such strings sort by time."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _identity(result: JobResult) -> dict[str, Any]:
    """What must agree for two recordings of one key to count as the same result."""
    return {"model_label": result.model_label, "spec": canonical_json(result.spec),
            "scores": sorted((s.task, s.metric, s.value, None if s.stderr != s.stderr else s.stderr,
                              s.samples) for s in result.scores),
            "coefficients": sorted((c.submodule, c.task, c.value) for c in result.coefficients)}


def _differences(old: JobResult, new: JobResult) -> list[str]:
    """The parts of `_identity` in which two results of one key disagree (empty: the same)."""
    a, b = _identity(old), _identity(new)
    return [name for name in b if a[name] != b[name]]


class ResultStore:
    """One SQLite file of results; open it once per process (`with ResultStore(path) as store:`)."""

    def __init__(self, path: Path | str = DEFAULT_STORE_PATH, *, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the directory {self.path.parent} for the result store "
                f"{self.path}: {exc.strerror or exc}; pass a writable store path"
            ) from exc
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory; the result store path must be a file")
        try:
            self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._translate(exc, "opening it") from exc
        try:
            with self._errors("opening it"):
                self._conn.execute("PRAGMA foreign_keys = ON")
                self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
                self._refuse_foreign_database()
                migrate(self._conn, str(self.path))
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._errors("reading the schema version"):
            return self._conn.execute("SELECT MAX(id) FROM schema_migrations").fetchone()[0]

    # -- errors and transactions -------------------------------------------------------------

    def _translate(self, exc: sqlite3.Error, doing: str) -> StoreError:
        msg = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
            return StoreError(
                f"{self.path} is locked by another process (waited {self.timeout_s:g} s while "
                f"{doing}); wait for the other run to finish or raise the store timeout"
            )
        if "unable to open" in msg or "readonly" in msg:
            return StoreError(f"cannot write the result store {self.path} ({msg}) while {doing}; "
                              "check that its directory exists and is writable")
        if isinstance(exc, sqlite3.IntegrityError):
            hint = " (SQLite stores NaN as NULL: is a value NaN?)" if "NOT NULL" in msg else ""
            return StoreError(f"{self.path}: {doing} was rejected by the schema ({msg}){hint}; "
                              "nothing of it was written")
        if isinstance(exc, sqlite3.OperationalError):
            return StoreError(f"{self.path}: SQLite failed while {doing}: {msg}")
        return StoreError(f"{self.path} is not a merge-harness result store (corrupt or not "
                          f"SQLite): {msg}; move it aside or use another store path")

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise self._translate(exc, doing) from exc

    @contextlib.contextmanager
    def _tx(self, doing: str, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; rolled back (nothing written) if anything inside raises."""
        with self._errors(doing), self._conn:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield self._conn

    def transaction(self, doing: str, *, write: bool = True):
        """`_tx` for the store's companion modules (`merge_harness.store.claims`): errors name `doing`."""
        return self._tx(doing, write=write)

    def _refuse_foreign_database(self) -> None:
        tables = [r[0] for r in self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        if tables and "schema_migrations" not in tables:
            raise StoreError(f"{self.path} is not a merge-harness result store (corrupt or not "
                             f"SQLite): it is an SQLite database with other tables {tables[:5]}")

    # -- experiments and job status ----------------------------------------------------------

    def ensure_experiment(self, name: str, config: Mapping[str, Any]) -> None:
        """Create the experiment or update its config (stored as canonical JSON)."""
        config_json = canonical_json(dict(config), f"config of experiment {name!r}")
        with self._tx(f"saving experiment {name!r}") as conn:
            conn.execute(
                "INSERT INTO experiments (name, config_json, created_at, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "config_json = excluded.config_json, updated_at = excluded.updated_at",
                (name, config_json, utc_now(), utc_now()))

    def experiment_names(self) -> list[str]:
        """Every experiment the store knows, in name order."""
        with self._errors("listing experiments"):
            return [name for (name,) in self._conn.execute("SELECT name FROM experiments ORDER BY name")]

    def _ensure_experiment_row(self, experiment: str) -> None:
        now = utc_now()
        self._conn.execute("INSERT OR IGNORE INTO experiments (name, created_at, updated_at) "
                           "VALUES (?, ?, ?)", (experiment, now, now))

    def _add_to_experiment(self, key: str, experiment: str) -> bool:
        self._ensure_experiment_row(experiment)
        return self._conn.execute("INSERT OR IGNORE INTO experiment_jobs (experiment, job_key) "
                                  "VALUES (?, ?)", (experiment, key)).rowcount > 0

    def attach(self, key: str, experiment: str) -> None:
        """List an existing job (e.g. a reused finished result) under `experiment` too."""
        with self._tx(f"adding job {key} to experiment {experiment!r}") as conn:
            if not conn.execute("SELECT 1 FROM jobs WHERE key = ?", (key,)).fetchone():
                raise StoreError(f"{self.path} has no job {key}; record or start it first")
            self._add_to_experiment(key, experiment)

    def _mark(self, key: str, experiment: str, spec: Mapping[str, Any], label: str | None,
              status: str) -> None:
        spec_json = canonical_json(dict(spec), f"spec of job {key}")
        label = label or (spec.get("label") if isinstance(spec.get("label"), str) else key[:12])
        update = ("DO NOTHING" if status == "pending" else
                  "DO UPDATE SET status = 'running', started_at = excluded.started_at, "
                  "finished_at = NULL, error = NULL WHERE jobs.status != 'done'")
        with self._tx(f"marking job {key} {status}") as conn:
            self._ensure_experiment_row(experiment)
            conn.execute(
                "INSERT INTO jobs (key, experiment, label, spec_json, status, created_at, "
                f"started_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) {update}",
                (key, experiment, label, spec_json, status, utc_now(),
                 None if status == "pending" else utc_now()))
            self._add_to_experiment(key, experiment)

    def mark_pending(self, key: str, experiment: str, spec: Mapping[str, Any], *,
                     label: str | None = None) -> None:
        """Register a planned job (no-op if the key is already known)."""
        self._mark(key, experiment, spec, label, "pending")

    def mark_started(self, key: str, experiment: str, spec: Mapping[str, Any], *,
                     label: str | None = None) -> None:
        """Status 'running' (a killed run leaves it so); a finished job keeps status 'done'."""
        self._mark(key, experiment, spec, label, "running")

    def mark_failed(self, key: str, error: str) -> None:
        """Status 'failed' with the error text; a finished job keeps status 'done'."""
        with self._tx(f"marking job {key} failed") as conn:
            if not conn.execute("SELECT 1 FROM jobs WHERE key = ?", (key,)).fetchone():
                raise StoreError(f"{self.path} has no job {key}; call mark_started first")
            conn.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? "
                         "WHERE key = ? AND status != 'done'", (error, utc_now(), key))

    def jobs(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Every job (any status) with its times and error, oldest first."""
        sql = ("SELECT key, experiment, label, status, error, created_at, started_at, "
               "finished_at, peak_rss_mb FROM jobs")
        params: tuple = ()
        if experiment is not None:
            sql += " WHERE key IN (SELECT job_key FROM experiment_jobs WHERE experiment = ?)"
            params = (experiment,)
        with self._tx("listing jobs", write=False) as conn:
            cursor = conn.execute(sql + " ORDER BY created_at, key", params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor]

    # -- results -----------------------------------------------------------------------------

    def cached_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The sha256 recorded for this file, if it has not changed since."""
        with self._errors("reading file hashes"):
            row = self._conn.execute(
                "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
                (path, size, mtime_ns)).fetchone()
        return row[0] if row else None

    def save_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        with self._tx("saving a file hash") as conn:
            conn.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
                         (path, size, mtime_ns, sha256))

    def weights_known_finite(self, sha256: str) -> bool:
        """Whether the weight file with this content hash was checked free of NaN/inf before."""
        with self._errors("reading weight checks"):
            return self._conn.execute("SELECT 1 FROM finite_weights WHERE sha256 = ?",
                                      (sha256,)).fetchone() is not None

    def save_weights_finite(self, sha256: str) -> None:
        with self._tx("saving a weight check") as conn:
            conn.execute("INSERT OR IGNORE INTO finite_weights VALUES (?, ?)", (sha256, utc_now()))

    def has_result(self, key: str) -> bool:
        with self._errors(f"looking up job {key}"):
            return self._conn.execute("SELECT 1 FROM jobs WHERE key = ? AND status = 'done'",
                                      (key,)).fetchone() is not None

    def get_result(self, key: str) -> JobResult | None:
        with self._tx(f"reading job {key}", write=False):
            return self._load(key)

    def samples_log(self, key: str) -> list[dict]:
        """The per-sample log of a job (empty when it stored none), without the rest of it."""
        with self._tx(f"reading the samples of job {key}", write=False):
            return self._samples_log(key)

    def _samples_log(self, key: str) -> list[dict]:
        rows = self._conn.execute("SELECT payload FROM samples WHERE job_key = ? ORDER BY seq", (key,))
        return [json.loads(payload) for (payload,) in rows]

    def _load(self, key: str) -> JobResult | None:
        q = self._conn.execute
        row = q("SELECT experiment, label, spec_json, peak_rss_mb FROM jobs "
                "WHERE key = ? AND status = 'done'", (key,)).fetchone()
        if row is None:
            return None
        scores = [Score(*r) for r in q("SELECT task, metric, value, stderr, samples FROM scores "
                                       "WHERE job_key = ? ORDER BY rowid", (key,))]
        coefficients = [Coefficient(*r) for r in q(
            "SELECT submodule, task, value FROM coefficients WHERE job_key = ? ORDER BY rowid",
            (key,))]
        timings = dict(q("SELECT phase, seconds FROM timings WHERE job_key = ? ORDER BY rowid",
                         (key,)).fetchall())
        versions = dict(q("SELECT package, version FROM versions WHERE job_key = ? "
                          "ORDER BY rowid", (key,)).fetchall())
        samples = self._samples_log(key)
        return JobResult(key=key, experiment=row[0], model_label=row[1],
                         spec=json.loads(row[2]), scores=scores, coefficients=coefficients,
                         timings=timings, versions=versions, peak_rss_mb=row[3],
                         samples_log=samples or None)

    def record(self, result: JobResult, *, replace: bool = False) -> None:
        """Store a finished job in one transaction (see the module docstring for re-recording)."""
        with self._tx(f"recording job {result.key}"):
            self._record(result, replace)

    def _record(self, r: JobResult, replace: bool) -> bool:
        """Inside a transaction; True if anything was written (content or experiment link)."""
        spec_json = canonical_json(r.spec, f"spec of job {r.key}")
        existing = self._load(r.key)
        old, new = _identity(existing) if existing else {}, _identity(r)
        if old == new:
            return self._add_to_experiment(r.key, r.experiment)
        if existing is not None and not replace:
            differ = ", ".join(_differences(existing, r))
            raise StoreError(
                f"{self.path}: job {r.key} ({existing.model_label!r}, experiment "
                f"{existing.experiment!r}) already has a different finished result (the "
                f"{differ} differ; new one from experiment {r.experiment!r}); pass replace=True "
                "to overwrite it")
        q, now = self._conn.execute, utc_now()
        self._ensure_experiment_row(r.experiment)
        q("INSERT INTO jobs (key, experiment, label, spec_json, status, created_at, started_at, "
          "finished_at, peak_rss_mb) VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?) "
          "ON CONFLICT(key) DO UPDATE SET label = excluded.label, spec_json = "
          "excluded.spec_json, status = 'done', started_at = COALESCE(jobs.started_at, "
          "excluded.started_at), finished_at = excluded.finished_at, error = NULL, "
          "peak_rss_mb = excluded.peak_rss_mb",
          (r.key, r.experiment, r.model_label, spec_json, now, now, now, r.peak_rss_mb))
        for table in ("scores", "coefficients", "timings", "versions", "samples"):
            q(f"DELETE FROM {table} WHERE job_key = ?", (r.key,))
        q_many = self._conn.executemany
        q_many("INSERT INTO scores (job_key, task, metric, value, stderr, samples) VALUES "
               "(?, ?, ?, ?, ?, ?)",
               [(r.key, s.task, s.metric, s.value, s.stderr, s.samples) for s in r.scores])
        q_many("INSERT INTO coefficients (job_key, submodule, task, value) VALUES (?, ?, ?, ?)",
               [(r.key, c.submodule, c.task, c.value) for c in r.coefficients])
        q_many("INSERT INTO timings (job_key, phase, seconds) VALUES (?, ?, ?)",
               [(r.key, phase, s) for phase, s in r.timings.items()])
        q_many("INSERT INTO versions (job_key, package, version) VALUES (?, ?, ?)",
               [(r.key, p, v) for p, v in r.versions.items()])
        q_many("INSERT INTO samples (job_key, seq, payload) VALUES (?, ?, ?)",
               [(r.key, i, canonical_json(p, f"sample {i} of job {r.key}"))
                for i, p in enumerate(r.samples_log or [])])
        self._add_to_experiment(r.key, r.experiment)
        return True

    # -- queries for reports -----------------------------------------------------------------

    def results_frame(self, experiment: str | None = None) -> pd.DataFrame:
        """One row per (job, task, metric) of the finished jobs: what every report starts from.

        Columns: `RESULT_COLUMNS`, then `param_<name>` for each merge parameter found in the specs
        (spec["merge"]["params"] or spec["params"]; nested names joined by ".", lists as JSON
        text), then `time_<phase>` seconds. `method` is spec["merge"]["method"] or spec["method"].
        With `experiment`, only its jobs, and the `experiment` column says that experiment.
        """
        import pandas as pd

        exp_col, where, params = self._scope(experiment)
        with self._tx("reading results", write=False) as conn:
            rows = conn.execute(
                f"SELECT j.key, {exp_col}, j.label, j.spec_json, s.task, s.metric, s.value, "
                "s.stderr, s.samples, j.peak_rss_mb FROM scores s JOIN jobs j ON j.key = s.job_key "
                f"WHERE j.status = 'done'{where} ORDER BY 2, j.label, j.key, s.task, s.metric",
                params).fetchall()
            times: dict[str, dict[str, float]] = {}
            for key, phase, seconds in conn.execute(
                    "SELECT t.job_key, t.phase, t.seconds FROM timings t JOIN jobs j ON "
                    f"j.key = t.job_key WHERE j.status = 'done'{where}", params):
                times.setdefault(key, {})[f"time_{phase}"] = seconds
        records = []
        for key, exp, label, spec_json, task, metric, value, stderr, samples, rss in rows:
            method, merge_params = merge_of(json.loads(spec_json))
            records.append({"key": key, "experiment": exp, "label": label, "method": method,
                            "task": task, "metric": metric, "value": value, "stderr": stderr,
                            "samples": samples, "peak_rss_mb": rss, "spec_json": spec_json,
                            **{f"param_{k}": v for k, v in merge_params.items()},
                            **times.get(key, {})})
        extra = sorted({c for r in records for c in r} - set(RESULT_COLUMNS),
                       key=lambda c: (c.startswith("time_"), c))
        frame = pd.DataFrame.from_records(records, columns=RESULT_COLUMNS + extra)
        return frame.astype({"value": float, "stderr": float, "peak_rss_mb": float,
                             "samples": "Int64"})

    def coefficients_frame(self, key: str | None = None) -> pd.DataFrame:
        """One row per solved coefficient (key, experiment, label, submodule, task, value)."""
        import pandas as pd

        sql = ("SELECT c.job_key, j.experiment, j.label, c.submodule, c.task, c.value "
               "FROM coefficients c JOIN jobs j ON j.key = c.job_key WHERE j.status = 'done'")
        params: tuple = () if key is None else (key,)
        with self._tx("reading coefficients", write=False) as conn:
            rows = conn.execute(sql + (" AND c.job_key = ?" if key else "")
                                + " ORDER BY c.job_key, c.rowid", params).fetchall()
        columns = ["key", "experiment", "label", "submodule", "task", "value"]
        return pd.DataFrame.from_records(rows, columns=columns).astype({"value": float})

    def _scope(self, experiment: str | None) -> tuple[str, str, dict[str, str]]:
        if experiment is None:
            return "j.experiment", "", {}
        return (":experiment", " AND j.key IN (SELECT job_key FROM experiment_jobs "
                "WHERE experiment = :experiment)", {"experiment": experiment})

    # -- pooling results between machines ------------------------------------------------------

    def export_jsonl(self, path: Path | str, experiment: str | None = None,
                     labels: Sequence[str] = ()) -> int:
        """Write one JSON object (a whole JobResult) per finished job and experiment it serves;
        with `labels`, only the jobs of those model labels.

        Written to a temporary file and renamed, so `path` is never half-written. Returns the
        number of lines.
        """
        path = Path(path)
        where = (" AND l.experiment = ?" if experiment else "") + (
            f" AND j.label IN ({', '.join('?' * len(labels))})" if labels else "")
        sql = ("SELECT j.key, l.experiment FROM jobs j JOIN experiment_jobs l ON l.job_key = j.key"
               f" WHERE j.status = 'done'{where}"
               " ORDER BY j.key, l.experiment != j.experiment, l.experiment")
        params = ((experiment,) if experiment else ()) + tuple(labels)
        lines = []
        with self._tx(f"exporting to {path}", write=False) as conn:
            for key, exp in conn.execute(sql, params).fetchall():
                result = dataclasses.replace(self._load(key), experiment=exp)
                lines.append(canonical_json(dataclasses.asdict(result), f"result of job {key}"))
        try:
            atomic_write_text(path, "".join(line + "\n" for line in lines))
        except HarnessError as exc:
            raise StoreError(f"cannot write the export {path}: {exc}") from exc
        return len(lines)

    def import_jsonl(self, source: ResultsFile | Path | str) -> ImportOutcome:
        """Import an `export_jsonl` file (a path, or one `read_results_jsonl` read) in one transaction.

        A line whose job is stored with identical content is skipped (only its experiment is
        added); a line whose key is stored with other content (scores, label, spec or
        coefficients) is a conflict: reported, never written, and the stored result is kept.
        Every other line is imported. A malformed line raises `StoreError` before anything is
        written (see `read_results_jsonl`).
        """
        results = source if isinstance(source, ResultsFile) else read_results_jsonl(source)
        imported, skipped, conflicts = 0, 0, []
        with self._tx(f"importing {results.path}"):
            for lineno, result in results.lines:
                try:
                    existing = self._load(result.key)
                    differ = _differences(existing, result) if existing else []
                    if differ:
                        conflicts.append(ImportConflict(lineno, result.key, existing.model_label,
                                                        existing.experiment, tuple(differ)))
                    elif self._record(result, replace=False):
                        imported += 1
                    else:
                        skipped += 1
                except (StoreError, sqlite3.Error) as exc:
                    raise StoreError(f"{results.path}:{lineno}: {exc}; nothing was imported") from exc
        return ImportOutcome(imported, skipped, tuple(conflicts))


def merge_of(spec: Any) -> tuple[str | None, dict[str, Any]]:
    """(method, flattened params) of a job spec, whatever else it holds: the one reading of a
    spec's merge that the store's columns and every report share. Nested parameters become
    dotted names (`a.b`); lists their canonical JSON."""
    spec = spec if isinstance(spec, dict) else {}
    source = spec["merge"] if isinstance(spec.get("merge"), dict) else spec
    method, params = source.get("method"), source.get("parameters", source.get("params"))
    return (method if isinstance(method, str) else None,
            _flatten(params) if isinstance(params, dict) else {})


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = canonical_json(value) if isinstance(value, list) else value
    return flat
