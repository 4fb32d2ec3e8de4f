"""Slot uids for the sandbox: each running program gets a uid of its own (as root).

RLIMIT_NPROC counts every process of a uid, so programs sharing one uid share one process limit:
a neighbour holding forks could stop a correct program from starting. Each run holds one of the
uids in `SLOT_UIDS` (skipping any an account uses), locked with flock so that it is exclusive
across threads and processes (and released by the kernel if the harness dies), and whatever
still runs as that uid is killed before the slot is taken and after it is handed back.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import pwd
import subprocess
import tempfile
import time
from collections.abc import Iterator

from merge_harness.core.errors import EvaluationError

logger = logging.getLogger("merge_harness.tasks.sandbox")

SLOT_UIDS = range(60000, 60256)  # one per running program (uid = gid), skipping named users
SLOT_LOCKS = "/run/merge-harness-sandbox"  # root-only; the fallback is under the temp dir
SYSTEM_PYTHON = "/usr/bin/python3"


@contextlib.contextmanager
def slot_uid(privileged: bool) -> Iterator[int | None]:
    """As root, a slot uid held for one run, with nothing of it running before or after."""
    if not privileged:
        yield None
        return
    lock, uid = acquire_slot()
    try:
        sweep(uid)  # strays of a harness that died holding this slot
        yield uid
    finally:
        sweep(uid)
        os.close(lock)  # releases the flock


def acquire_slot() -> tuple[int, int]:
    """An flock on the first free slot's lock file: exclusive across threads and processes, and
    released by the kernel if the harness dies."""
    directory = slot_directory()
    while True:
        for uid in slot_uids():
            fd = os.open(os.path.join(directory, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd, uid
            except BlockingIOError:
                os.close(fd)
        time.sleep(0.05)  # every slot busy (256 programs running): wait for one


@functools.cache
def slot_uids() -> tuple[int, ...]:
    """Slot uids no account on this machine uses (an account's processes would be swept)."""
    def named(uid: int) -> bool:
        try:
            return bool(pwd.getpwuid(uid))
        except KeyError:
            return False
    return tuple(uid for uid in SLOT_UIDS if not named(uid))


@functools.cache
def slot_directory() -> str:
    directory = SLOT_LOCKS if os.access(os.path.dirname(SLOT_LOCKS), os.W_OK) else os.path.join(
        tempfile.gettempdir(), "merge-harness-sandbox-slots")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if info.st_uid != 0 or info.st_mode & 0o077:
        raise EvaluationError(f"sandbox slot locks: {directory} must be a directory of root's with "
                              "mode 0700; remove it and run again")
    return directory


def sweep(uid: int, patience_s: float = 5.0) -> None:
    """Kill every process running as slot `uid` and wait until none is left: stragglers (or
    zombies) would count toward the next program's RLIMIT_NPROC."""
    deadline = time.monotonic() + patience_s
    while has_processes(uid):
        if time.monotonic() > deadline:
            logger.warning("sandbox: processes of uid %d outlived %.0f s of SIGKILLs", uid, patience_s)
            return
        # kill(-1) *as the uid* reaches exactly its processes, with no race on reused PIDs; the
        # one-liner checks it is not root first (as root, kill(-1) would end the machine).
        killer = "import os, sys; u = int(sys.argv[1]); assert u and os.getuid() == u; os.kill(-1, 9)"
        subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", killer, str(uid)], user=uid, group=uid,
                       extra_groups=[], cwd="/", env={}, capture_output=True, check=False)
        time.sleep(0.01)


def has_processes(uid: int) -> bool:
    """Whether any process runs as `uid` (real, effective or saved; from /proc/PID/status, since a
    process that switched uid is not dumpable and its /proc directory belongs to root)."""
    wanted = str(uid).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "status"), "rb") as file:
                status = file.read()
        except OSError:  # exited meanwhile
            continue
        if wanted in status.partition(b"\nUid:")[2].partition(b"\n")[0].split():
            return True
    return False
