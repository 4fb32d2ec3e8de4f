"""Claims on jobs in the store (merge_harness.store.claims):
take, renew, expire, take over, release; explicit clocks."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from merge_harness.core.errors import ConfigError
from merge_harness.core.results import JobResult, Score
from merge_harness.store.claims import Claims, heartbeat, owner_alive, runner_id
from merge_harness.store.database import ResultStore, utc_now


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        yield store


def claims_table(store: ResultStore) -> dict[str, tuple[str, float]]:
    with sqlite3.connect(store.path) as conn:
        return {key: (owner, expires) for key, owner, expires in
                conn.execute("SELECT job_key, owner, expires_at FROM claims")}


def test_take_claims_free_keys_and_skips_those_another_runner_holds(store):
    clock = Clock()
    a, b = Claims(store, "a", 60, clock), Claims(store, "b", 60, clock)
    assert a.take(["k1", "k2"]) == ["k1", "k2"]
    assert b.take(["k1", "k2", "k3"]) == ["k3"]
    assert claims_table(store) == {"k1": ("a", 1060.0), "k2": ("a", 1060.0), "k3": ("b", 1060.0)}
    clock.now = 1010.0
    assert a.take(["k1"]) == ["k1"]  # a key this runner holds is taken again: renewed
    assert claims_table(store)["k1"] == ("a", 1070.0)


def test_renew_extends_only_this_runners_claims(store):
    clock = Clock()
    a, b = Claims(store, "a", 60, clock), Claims(store, "b", 60, clock)
    a.take(["k1", "k2"])
    b.take(["k3"])
    clock.now = 1050.0
    assert a.renew() == 2
    assert claims_table(store) == {"k1": ("a", 1110.0), "k2": ("a", 1110.0), "k3": ("b", 1060.0)}


def test_an_expired_claim_is_taken_over_and_its_old_owner_cannot_renew_it(store):
    clock = Clock()
    dead, alive = Claims(store, "dead", 60, clock), Claims(store, "alive", 30, clock)
    dead.take(["k1"])
    clock.now = 1059.9
    assert alive.take(["k1"]) == []  # still live
    clock.now = 1060.0
    assert alive.take(["k1"]) == ["k1"]
    assert claims_table(store) == {"k1": ("alive", 1090.0)}
    assert dead.renew() == 0  # it comes back: the job is no longer its own
    assert dead.take(["k1"]) == []


def test_claims_on_finished_jobs_are_dropped_by_the_next_take(store):
    clock = Clock()
    dead, alive = Claims(store, "dead", 60, clock), Claims(store, "alive", 60, clock)
    dead.take(["done", "open"])
    store.record(JobResult("done", "e", "m", {"x": 1}, [Score("t", "acc", 0.5)]))  # then it died
    assert alive.take(["other"]) == ["other"]
    assert set(claims_table(store)) == {"open", "other"}  # an unfinished job's claim waits for a taker


def test_a_runner_whose_process_is_gone_from_this_host_is_taken_over_at_once(store):
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    gone = f"{socket.gethostname()}:{exited.stdout.strip()}:abcd1234"
    assert not owner_alive(gone)
    assert owner_alive(runner_id())  # this process
    assert owner_alive(f"elsewhere.example:{exited.stdout.strip()}:abcd1234")  # only the lease tells
    Claims(store, gone, 600).take(["k1"])
    assert Claims(store, "b", 600).take(["k1"]) == ["k1"]  # no need to wait 600 s


def test_a_live_owner_is_asked_only_when_its_lease_has_not_run_out(store):
    clock, asked = Clock(), []

    def alive(owner):
        asked.append(owner)
        return True

    Claims(store, "a", 60, clock).take(["k1"])
    assert Claims(store, "b", 60, clock, alive).take(["k1"]) == [] and asked == ["a"]


def test_release_drops_the_given_claims_or_all_of_this_runners(store):
    clock = Clock()
    a, b = Claims(store, "a", 60, clock), Claims(store, "b", 60, clock)
    a.take(["k1", "k2", "k3"])
    b.take(["k4"])
    assert b.release(["k1"]) == 0  # not its claim
    assert a.release(["k1"]) == 1
    assert b.take(["k1"]) == ["k1"]  # free at once, no lease to wait for
    assert a.release() == 2
    assert claims_table(store) == {"k1": ("b", 1060.0), "k4": ("b", 1060.0)}


def test_a_finished_job_is_never_claimed_and_a_failure_only_before_this_run(store):
    store.record(JobResult("done", "e", "m", {"x": 1}, [Score("t", "acc", 0.5)]))
    store.mark_started("failed-before", "e", {"x": 2})
    store.mark_failed("failed-before", "boom")
    time.sleep(0.002)  # the store's times have millisecond resolution
    started = utc_now()
    store.mark_started("failed-during", "e", {"x": 3})
    store.mark_failed("failed-during", "boom")
    claims = Claims(store, "a", 60, Clock())
    keys = ["done", "failed-before", "failed-during", "new"]
    assert claims.take(keys, failed_since=started) == ["failed-before", "new"]
    assert claims.take(keys) == ["failed-before", "failed-during", "new"]


def test_take_is_one_transaction_so_racing_runners_never_share_a_key(tmp_path):
    path, keys = tmp_path / "s.sqlite", [f"k{i}" for i in range(200)]
    ResultStore(path).close()
    won: dict[str, list[str]] = {}

    def runner(name: str) -> None:
        with ResultStore(path, timeout_s=30) as store:
            claims, won[name] = Claims(store, name, 60), []
            for index in range(0, len(keys), 5):
                won[name] += claims.take(keys[index:index + 5])

    threads = [threading.Thread(target=runner, args=(f"r{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    taken = [key for name in won for key in won[name]]
    assert sorted(taken) == sorted(keys)  # every key claimed once, by exactly one runner


def test_the_heartbeat_renews_from_its_own_thread_and_stops(store):
    claims = Claims(store, "a", lease_s=0.4)
    claims.take(["k1"])
    first = claims_table(store)["k1"][1]
    with heartbeat(claims):
        time.sleep(0.35)
        assert claims_table(store)["k1"][1] > first
    stopped = claims_table(store)["k1"][1]  # the thread has been joined
    time.sleep(0.25)
    assert claims_table(store)["k1"][1] == stopped


def test_a_lease_must_be_positive(store):
    with pytest.raises(ConfigError, match="lease_s"):
        Claims(store, lease_s=0)
