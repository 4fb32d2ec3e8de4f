"""Several runner processes on one store: each job computed once, a killed runner's jobs taken over.

Each runner is a real process. `DRIVER` calls `run_experiment` and appends "pid time key" to a
shared log after each result is committed, so a job computed twice would show up twice there
(recording an identical result again is a silent no-op in the store).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_experiment

JOBS = 12  # write_experiment: 6 models (pre-trained, 2 fine-tunes, 3 merges) x 2 tasks
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

DRIVER = """
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import merge_harness.run.driver as driver
import merge_harness.run.runner as runner
from merge_harness.run.experiment import load_experiment
from merge_harness.store.database import ResultStore

experiment_path, log, lease_s, out = sys.argv[1:5]
original = driver.run_model_job

def logged_run_model_job(job, pending, experiment, sink, models=None):
    def sink_and_log(result):
        sink(result)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {time.time()} {result.key}\\n")
    original(job, pending, experiment, sink_and_log, models)

driver.run_model_job = logged_run_model_job
experiment = load_experiment(experiment_path)
Path(out + ".ready").touch()
while not Path(log + ".go").exists():
    time.sleep(0.02)
with ResultStore(experiment.store, timeout_s=30) as store:
    s = runner.run_experiment(experiment, store, show_progress=False, lease_s=float(lease_s))
Path(out).write_text(json.dumps({"pid": os.getpid(), "reused": s.reused, "computed": s.computed,
    "elsewhere": s.elsewhere, "unfinished": s.elsewhere_unfinished, "failed": s.failed}))
"""


def start_runner(experiment: Path, log: Path, out: Path, lease_s: float) -> subprocess.Popen:
    command = [sys.executable, "-c", DRIVER, str(experiment), str(log), str(lease_s), str(out)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(outs: list[Path], processes: list[subprocess.Popen], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(Path(f"{out}.ready").exists() for out in outs):
        for process in processes:
            assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "runners did not start"
        time.sleep(0.05)


def finish(processes: list[subprocess.Popen], timeout_s: float = 600) -> list[str]:
    stderrs = []
    for process in processes:
        _, stderr = process.communicate(timeout=timeout_s)
        assert process.returncode == 0, stderr
        assert "locked" not in stderr, stderr
        stderrs.append(stderr)
    return stderrs


def computations(log: Path) -> list[tuple[int, float, str]]:
    lines = log.read_text().split() if log.exists() else []
    return [(int(pid), float(t), key) for pid, t, key in zip(lines[::3], lines[1::3], lines[2::3])]


def store_rows(store: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(store) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # no tables yet
            return []


def assert_every_job_stored_once(store: Path) -> None:
    assert store_rows(store, "SELECT COUNT(*) FROM jobs WHERE status = 'done'") == [(JOBS,)]
    assert store_rows(store, "SELECT COUNT(DISTINCT job_key) FROM timings") == [(JOBS,)]
    per_job = store_rows(store, "SELECT job_key, task, COUNT(*) FROM scores GROUP BY job_key, task")
    assert len(per_job) == JOBS  # one task's scores per job, none twice (primary key)
    assert store_rows(store, "SELECT COUNT(*) FROM claims") == [(0,)]  # all released


@pytest.mark.parametrize("runners", [2, 4])
def test_concurrent_runners_compute_each_job_exactly_once(runners, chat_zoo, tmp_path):
    store = tmp_path / "results.sqlite"
    experiment = write_experiment(tmp_path / "e.yaml", chat_zoo, store)
    log, outs = tmp_path / "computed.log", [tmp_path / f"runner{i}.json" for i in range(runners)]
    processes = [start_runner(experiment, log, out, lease_s=60) for out in outs]
    wait_ready(outs, processes)
    Path(f"{log}.go").touch()  # every runner starts its run at the same moment
    finish(processes)
    summaries = [json.loads(out.read_text()) for out in outs]
    keys = [key for _, _, key in computations(log)]
    assert len(keys) == len(set(keys)) == JOBS  # each job computed once, by one runner
    assert sum(s["computed"] for s in summaries) == JOBS
    for s in summaries:
        assert s["failed"] == []  # and a job still running elsewhere at its end is not one
        assert s["reused"] + s["computed"] + s["elsewhere"] == JOBS
    assert sum(s["computed"] > 0 for s in summaries) >= 2  # the work was shared
    assert_every_job_stored_once(store)


def test_two_cli_runs_started_a_second_apart_share_the_grid(chat_zoo, tmp_path):
    store = tmp_path / "results.sqlite"
    experiment = write_experiment(tmp_path / "e.yaml", chat_zoo, store)
    command = [sys.executable, "-m", "merge_harness", "--threads", "1", "run", str(experiment), "--quiet"]
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    second = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    computed = []
    for process in (first, second):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        assert "locked" not in stderr
        summary = re.search(r"(\d+) jobs: (\d+) reused, (\d+) computed, (?:(\d+) held by another "
                            r"runner, )?0 failed", stdout)
        assert summary, stdout
        total, reused, done, elsewhere = (int(g or 0) for g in summary.groups())
        assert (total, reused + done + elsewhere) == (JOBS, JOBS)
        computed.append(done)
    assert sum(computed) == JOBS
    assert_every_job_stored_once(store)


def not_writing(store: Path) -> bool:
    """Whether the store's write lock is free (a runner stopped inside a write would hold it)."""
    conn = sqlite3.connect(store, timeout=0.5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def freeze_holding_unfinished_claims(victim: subprocess.Popen, store: Path, log: Path) -> dict[str, float]:
    """SIGSTOP the victim once it has finished a job and holds claims on unfinished ones;
    returns those claims (key -> expires_at). Checked while it is stopped: no race."""
    held_sql = ("SELECT c.job_key, c.expires_at FROM claims c LEFT JOIN jobs j ON j.key = c.job_key "
                f"WHERE c.owner LIKE '%:{victim.pid}:%' AND j.status IS NOT 'done'")
    deadline = time.monotonic() + 300
    while True:
        assert victim.poll() is None and time.monotonic() < deadline, "the victim ended first"
        if store_rows(store, held_sql) and any(pid == victim.pid for pid, *_ in computations(log)):
            victim.send_signal(signal.SIGSTOP)
            time.sleep(0.1)  # let the stop land: a stopped process writes nothing
            if not_writing(store) and (held := dict(store_rows(store, held_sql))):
                return held
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_runners_claims_are_taken_over_and_nothing_is_lost(how, chat_zoo, tmp_path):
    """killed (SIGKILL): its process is gone, so its claims are taken over at once; hung (SIGSTOP:
    alive but silent): only once the lease has run out. Either way each job is computed once."""
    lease_s = 3.0
    store = tmp_path / "results.sqlite"
    experiment = write_experiment(tmp_path / "e.yaml", chat_zoo, store)
    log = tmp_path / "computed.log"
    outs = [tmp_path / "victim.json", tmp_path / "survivor.json"]
    victim, survivor = (start_runner(experiment, log, out, lease_s) for out in outs)
    try:
        wait_ready(outs, [victim, survivor])
        Path(f"{log}.go").touch()
        orphans = freeze_holding_unfinished_claims(victim, store, log)
        if how == "killed":
            victim.kill()
            victim.wait()
        finish([survivor])
        if json.loads(outs[1].read_text())["unfinished"]:  # it ended before it could take them
            time.sleep(max(0.0, max(orphans.values()) - time.time()))
            rerun = tmp_path / "rerun.json"
            process = start_runner(experiment, log, rerun, lease_s)
            wait_ready([rerun], [process])
            finish([process])
    finally:
        victim.kill()
        victim.wait()
    entries = computations(log)
    keys = [key for _, _, key in entries]
    assert len(keys) == len(set(keys)) == JOBS  # nothing lost, nothing computed twice
    assert {key for pid, _, key in entries if pid == victim.pid}.isdisjoint(orphans)
    if how == "hung":  # taken over only once the lease had run out
        assert all(finished_at >= orphans[key] for _, finished_at, key in entries if key in orphans)
    assert_every_job_stored_once(store)
