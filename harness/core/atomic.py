"""Writing files atomically: a temporary file in the same folder, then os.replace, so a reader
(a report viewer, a CI step, an importing teammate) never sees half a file.

Every temporary file or directory made here is named `.<target>.tmp-<pid>-<random>` and holds an
exclusive `flock` for as long as its writer lives (a directory on its `.lock` file). A writer
killed with `kill -9` cannot clean up, so the next write into the same folder does it
(`remove_stale_temps`): an entry is stale when its process is gone, or, in case that pid was
reused by another process, when it is older than a grace period and nobody holds its lock. A live
writer's entry is never removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from merge_harness.core.errors import HarnessError

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid check alone decides
    fcntl = None

TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[a-z0-9_]+)?(?:\.tmp)?$")
LOCK_FILE = ".lock"
GRACE_SECONDS = 60.0  # covers the instant between creating a temp entry and locking it


def temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def make_temp_dir(target: Path) -> tuple[Path, int]:
    """A locked hidden directory next to `target`: (its path, the fd holding its lock).

    Close the fd (`release`) only after the directory has been renamed or removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    path = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target)))
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    _lock(fd)
    return path, fd


def release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def _lock_is_free(entry: Path) -> bool:
    """True when nobody holds the entry's lock (a directory without its lock file counts as free)."""
    lock = entry / LOCK_FILE if entry.is_dir() else entry
    if fcntl is None:
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return entry.is_dir()  # an older-format temp dir, or one whose lock file is gone
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def is_stale(entry: Path) -> bool:
    """A temp entry whose writer is gone (see the module docstring)."""
    match = TEMP_NAME.match(entry.name)
    if match is None:
        return False
    if match["kind"] == "old" and not (entry.parent / match["target"]).exists():
        return False  # killed between the two renames of `replace_dir`: the only copy of the output
    if not _pid_alive(int(match["pid"])):
        return True
    try:
        age = time.time() - entry.lstat().st_mtime
    except OSError:
        return False
    return age > GRACE_SECONDS and _lock_is_free(entry)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files and directories that killed writers left in `folder`."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.is_symlink() or not is_stale(entry):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
        try:
            _lock(fd)  # held until the file has its final name: see the module docstring
            with open(fd, "wb", closefd=False) as out:
                out.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is for everyone
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise HarnessError(f"cannot write {path}: {exc.strerror or exc}; "
                           "pass a writable output folder") from exc
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
