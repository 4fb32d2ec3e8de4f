"""Process-level tuning for a streaming merge: keep freed memory for reuse, exit without teardown.

A streaming merge allocates and frees the same few block-sized buffers thousands of times. glibc
returns large freed blocks to the kernel (`munmap`, heap trimming), so every new block faults in
fresh zeroed pages: about a third of a task-arithmetic merge's time was system time spent there.
Raising glibc's mmap and trim thresholds keeps freed blocks in the heap for the next tensor; the
peak resident set stays what the largest tensor needs (plus up to `KEEP_BYTES` kept free).

Both functions change the whole process, so only entry points call them (`merge-harness merge`,
the merge benchmark's child process), never library code.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 256 * 1024**2  # blocks up to this size come from the heap and are kept for reuse


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to KEEP_BYTES for reuse; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, 4 * KEEP_BYTES), (M_TOP_PAD, 64 * 1024**2))
    return all(mallopt(option, value) == 1 for option, value in settings)


def return_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's `malloc_trim`); False elsewhere.

    For the end of a phase that freed model-sized buffers (a calibration stream, one Fisher
    fine-tune): with `keep_freed_memory` they would stay resident through the next phase.
    """
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


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
