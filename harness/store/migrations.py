"""The result store's SQLite schema, as an append-only list of named migrations.

Each entry of `MIGRATIONS` is `(name, sql)`; entry i (1-based) is recorded in `schema_migrations`
as `(i, name, applied_at)` when applied. A store written by an older harness migrates forward when
it is opened; a store written by a newer one is refused. Never edit, reorder or remove a released
entry: append a new one (e.g. `ALTER TABLE ... ADD COLUMN ...`) instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

from merge_harness.core.errors import StoreError

BOOTSTRAP = """CREATE TABLE IF NOT EXISTS schema_migrations (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    applied_at TEXT NOT NULL
)"""

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_initial",
        """
CREATE TABLE experiments (
    name        TEXT PRIMARY KEY,
    config_json TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE jobs (
    key         TEXT PRIMARY KEY,
    experiment  TEXT NOT NULL REFERENCES experiments(name),
    label       TEXT NOT NULL,
    spec_json   TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'running', 'failed', 'done')),
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    error       TEXT,
    peak_rss_mb REAL
);
CREATE TABLE scores (
    job_key TEXT NOT NULL REFERENCES jobs(key) ON DELETE CASCADE,
    task    TEXT NOT NULL,
    metric  TEXT NOT NULL,
    value   REAL NOT NULL,  -- SQLite stores NaN as NULL, so a NaN score is rejected here
    stderr  REAL,
    samples INTEGER,
    PRIMARY KEY (job_key, task, metric)
);
CREATE TABLE coefficients (
    job_key   TEXT NOT NULL REFERENCES jobs(key) ON DELETE CASCADE,
    submodule TEXT NOT NULL,
    task      TEXT NOT NULL,
    value     REAL NOT NULL,
    PRIMARY KEY (job_key, submodule, task)
);
CREATE TABLE timings (
    job_key TEXT NOT NULL REFERENCES jobs(key) ON DELETE CASCADE,
    phase   TEXT NOT NULL,
    seconds REAL NOT NULL,
    PRIMARY KEY (job_key, phase)
);
CREATE TABLE versions (
    job_key TEXT NOT NULL REFERENCES jobs(key) ON DELETE CASCADE,
    package TEXT NOT NULL,
    version TEXT NOT NULL,
    PRIMARY KEY (job_key, package)
);
CREATE TABLE samples (
    job_key TEXT NOT NULL REFERENCES jobs(key) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    payload TEXT NOT NULL,  -- one JSON object of lm-eval's per-sample log
    PRIMARY KEY (job_key, seq)
);
""",
    ),
    (
        # A result is keyed by content, so one job (e.g. the pre-trained model's scores) serves
        # every experiment that needs it; jobs.experiment stays the experiment that produced it.
        "0002_experiment_jobs",
        """
CREATE TABLE experiment_jobs (
    experiment TEXT NOT NULL REFERENCES experiments(name),
    job_key    TEXT NOT NULL REFERENCES jobs(key) ON DELETE CASCADE,
    PRIMARY KEY (experiment, job_key)
);
INSERT INTO experiment_jobs (experiment, job_key) SELECT experiment, key FROM jobs;
CREATE INDEX jobs_by_experiment ON jobs(experiment);
CREATE INDEX experiment_jobs_by_job ON experiment_jobs(job_key);
""",
    ),
    (
        # Content hashes of model files, so a re-run identifies unchanged models without
        # re-reading gigabytes: valid while (path, size, mtime) is unchanged.
        "0003_file_hashes",
        """
CREATE TABLE file_hashes (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256   TEXT NOT NULL
);
""",
    ),
    (
        # Weight files (by content hash) already checked free of NaN/inf: one pass per file, ever.
        "0004_finite_weights",
        """
CREATE TABLE finite_weights (
    sha256     TEXT PRIMARY KEY,
    checked_at TEXT NOT NULL
);
""",
    ),
    (
        # Several runners on one store: a runner computes a job only while it holds its claim.
        # A claim lapses at expires_at (Unix seconds) unless its owner renews it (heartbeat), so a
        # dead runner's jobs are taken over; finishing or failing a job deletes its claim.
        "0005_claims",
        """
CREATE TABLE claims (
    job_key    TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX claims_by_owner ON claims(owner);
""",
    ),
]


def statements(sql: str) -> Iterator[str]:
    """Split a migration script into complete statements (`executescript` would commit early)."""
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:80]!r}")


def applied_version(
    conn: sqlite3.Connection, where: str, migrations: Sequence[tuple[str, str]] = MIGRATIONS
) -> int:
    """How many of `migrations` the database holds; refuses a newer or diverging history."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not has_table:
        return 0
    applied = conn.execute("SELECT id, name FROM schema_migrations ORDER BY id").fetchall()
    for position, (mig_id, name) in enumerate(applied, start=1):
        if mig_id > len(migrations):
            raise StoreError(
                f"{where} has schema version {applied[-1][0]} ({applied[-1][1]}) but this "
                f"merge-harness knows only up to {len(migrations)}: it was written by a newer "
                "merge-harness; upgrade merge-harness to read it"
            )
        if mig_id != position or name != migrations[mig_id - 1][0]:
            raise StoreError(
                f"{where} has migration {mig_id} named {name!r} but this merge-harness expects "
                f"{migrations[position - 1][0]!r} there; the store was written by a diverging "
                "version of merge-harness"
            )
    return len(applied)


def migrate(
    conn: sqlite3.Connection, where: str, migrations: Sequence[tuple[str, str]] = MIGRATIONS
) -> int:
    """Apply the pending migrations in one transaction; returns the schema version.

    `conn` must be in autocommit mode (`isolation_level=None`); `where` names the file in errors.
    """
    if applied_version(conn, where, migrations) == len(migrations):
        return len(migrations)
    with conn:
        conn.execute("BEGIN IMMEDIATE")  # re-read under the write lock: another process may race
        conn.execute(BOOTSTRAP)
        done = applied_version(conn, where, migrations)
        for mig_id, (name, sql) in enumerate(migrations[done:], start=done + 1):
            for statement in statements(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (id, name, applied_at) VALUES (?, ?, ?)",
                (mig_id, name, datetime.now(timezone.utc).isoformat(timespec="seconds")),
            )
    return len(migrations)
