"""Process memory: glibc's allocator tuned for streaming merges, the peak resident set, and an
exit without teardown.

A streaming merge allocates and frees the same few block-sized buffers thousands of times. glibc
returns large freed blocks to the kernel (`munmap`, heap trimming), so every new block faults in
fresh zeroed pages: about a third of a task-arithmetic merge's time was system time spent there.
Raising glibc's mmap and trim thresholds keeps freed blocks in the heap for the next tensor; the
peak resident set stays what the largest tensor needs (plus up to `KEEP_BYTES` kept free).

`keep_freed_memory` and `exit_without_teardown` change the whole process, so only entry points
call them (`merge-harness merge`, the merge benchmark's child process), never library code;
`return_free_memory` only hands free pages back, and library code calls it after a phase that
freed model-sized buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import resource
import sys
from pathlib import Path

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 256 * 1024**2  # blocks up to this size come from the heap and are kept for reuse


@functools.cache
def _glibc_function(name: str, argtypes: tuple, restype) -> ctypes._CFuncPtr | None:
    """A glibc function with its signature set, or None (not Linux, or a libc without it: musl)."""
    library = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return function


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to KEEP_BYTES for reuse; False where there is no glibc."""
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None:
        return False
    settings = ((M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, 4 * KEEP_BYTES), (M_TOP_PAD, 64 * 1024**2))
    return all(mallopt(option, value) == 1 for option, value in settings)


def return_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's `malloc_trim`); False elsewhere.

    For the end of a phase that freed model-sized buffers (a calibration stream, one Fisher
    fine-tune): with `keep_freed_memory` they would stay resident through the next phase.
    """
    trim = _glibc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is None:
        return False
    trim(0)
    return True


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):  # elsewhere the peak stays the process's lifetime peak
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory of this process image since the last `reset_peak_rss`: VmHWM.

    Not `ru_maxrss` where VmHWM exists: Linux carries it over from the parent at fork, through
    exec, so a child of a large parent would report at least the parent's resident set.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def exit_without_teardown(code: int = 0) -> None:
    """Flush our output and logs, then end the process at once (`os._exit`).

    With torch loaded, the interpreter's own shutdown (freeing every module and tensor) takes
    0.3-0.8 s here, a fifth of a 135M-parameter merge. Everything the command wrote is already
    closed and renamed into place when this runs, so nothing is lost by skipping it.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(code)
