"""Claims: several runners on one store compute each job once.

A runner computes a job only while it holds the job's claim, a row (job_key, owner, claimed_at,
expires_at) of the store's `claims` table (migration 0005). `take` claims, in one
`BEGIN IMMEDIATE` transaction, the keys that are not finished and not held by another runner's
live claim; `renew` (the heartbeat, every lease/4 from a background thread with its own SQLite
connection) moves this runner's expiry forward; `release` deletes claims once their jobs are
finished or failed. A runner that dies or hangs stops renewing, and once its `expires_at` has
passed the next `take` takes its jobs over. A runner on this host whose process is gone (e.g.
after `kill -9`) is known dead at once, so a run restarted right after a kill does not wait for
the lease.

Times are Unix seconds from `clock` (default `time.time`, one clock for every process on a
machine); tests pass their own. SQLite's locks hold on a local disk only: several machines need
one driver (the Ray executor) or separate stores pooled later (docs/scale_out.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from merge_harness.core.errors import ConfigError, StoreError
from merge_harness.store.database import ResultStore

DEFAULT_LEASE_S = 120.0
logger = logging.getLogger(__name__)


def runner_id() -> str:
    """A name for this runner that no other process shares: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str) -> bool:
    """False only for a `runner_id` of this host whose process has exited (or is a zombie)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True  # elsewhere or not ours to judge: only the lease tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


class Claims:
    """One runner's claims in one store; uses the store's connection, so one thread only."""

    def __init__(
        self,
        store: ResultStore,
        owner: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
        alive: Callable[[str], bool] = owner_alive,
    ) -> None:
        if not lease_s > 0:
            raise ConfigError(f"lease_s: a claim's lease must be positive seconds, got {lease_s!r}")
        self.store, self.owner, self.lease_s = store, owner or runner_id(), lease_s
        self.clock, self.alive = clock, alive

    def on(self, store: ResultStore) -> Claims:
        """The same runner's claims through another connection (e.g. the heartbeat thread's)."""
        return Claims(store, self.owner, self.lease_s, self.clock, self.alive)

    def take(self, keys: Sequence[str], *, failed_since: str | None = None) -> list[str]:
        """Claim each key that is not done and not held by a live claim of another runner.

        Keys this runner holds already are renewed; a claim whose lease has run out, or whose
        owner `alive` says is dead, is taken over. Claims on finished jobs guard nothing and are
        deleted (a dead runner leaves them behind). With `failed_since` (a
        `merge_harness.store.database.utc_now` time), a job that failed after it is skipped: a runner working
        beside this one tried it during this run. Returns the keys now held.
        """
        now, taken = self.clock(), []
        with self.store.transaction(f"claiming {len(keys)} jobs") as conn:
            conn.execute("DELETE FROM claims WHERE job_key IN "
                         "(SELECT key FROM jobs WHERE status = 'done')")
            for key in keys:
                held = conn.execute("SELECT owner, expires_at FROM claims WHERE job_key = ?",
                                    (key,)).fetchone()
                if held and held[0] != self.owner and held[1] > now and self.alive(held[0]):
                    continue
                job = conn.execute("SELECT status, finished_at FROM jobs WHERE key = ?",
                                   (key,)).fetchone()
                if job and (job[0] == "done" or (failed_since and job[0] == "failed"
                                                 and (job[1] or "") >= failed_since)):
                    continue
                if held and held[0] != self.owner:
                    logger.info("taking over job %s from %s (%s)", key, held[0],
                                "lease ran out" if held[1] <= now else "process gone")
                conn.execute(
                    "INSERT INTO claims (job_key, owner, claimed_at, expires_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(job_key) DO UPDATE SET owner = excluded.owner, claimed_at = "
                    "excluded.claimed_at, expires_at = excluded.expires_at",
                    (key, self.owner, now, now + self.lease_s))
                taken.append(key)
        return taken

    def renew(self) -> int:
        """Extend every claim this runner holds by one lease from now; returns how many."""
        with self.store.transaction("renewing job claims") as conn:
            return conn.execute("UPDATE claims SET expires_at = ? WHERE owner = ?",
                                (self.clock() + self.lease_s, self.owner)).rowcount

    def release(self, keys: Sequence[str] | None = None) -> int:
        """Drop this runner's claims on `keys` (default: all of them); returns how many."""
        sql, params = "DELETE FROM claims WHERE owner = ?", [self.owner]
        if keys is not None:
            sql += f" AND job_key IN ({', '.join('?' * len(keys))})"
            params += list(keys)
        with self.store.transaction("releasing job claims") as conn:
            return conn.execute(sql, params).rowcount


@contextlib.contextmanager
def heartbeat(claims: Claims, every_s: float | None = None) -> Iterator[None]:
    """Renew `claims` every `every_s` (default lease/4) from a background thread while the body runs.

    The thread opens its own connection to the store (SQLite connections stay in their thread). A
    renewal that fails (store locked past its timeout) is logged and tried again next beat.
    """
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(claims, every_s or claims.lease_s / 4, stop),
                              name="claims-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _beat(claims: Claims, every_s: float, stop: threading.Event) -> None:
    try:
        with ResultStore(claims.store.path, timeout_s=claims.store.timeout_s) as store:
            mine = claims.on(store)
            while not stop.wait(every_s):
                try:
                    mine.renew()
                except StoreError as exc:
                    logger.warning("could not renew this runner's job claims: %s", exc)
    except StoreError as exc:
        logger.warning("job claims will not be renewed (another runner may take them over "
                       "after %g s): %s", claims.lease_s, exc)
