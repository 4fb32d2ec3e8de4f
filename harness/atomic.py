"""Writing files atomically: a temporary file in the same folder, then os.replace, so a reader
(a report viewer, a CI step, an importing teammate) never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from harness.errors import HarnessError


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is for everyone
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
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
