"""The merge command's process tuning: glibc keeps freed blocks, and the command ends without
interpreter teardown yet with everything written and said."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

from merge_harness.core.allocator import keep_freed_memory


def test_keep_freed_memory_applies_exactly_where_glibc_is():
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is on_glibc


def test_exit_without_teardown_flushes_output_and_skips_atexit(tmp_path):
    script = textwrap.dedent(
        """
        import atexit, sys
        from merge_harness.core.allocator import exit_without_teardown
        atexit.register(lambda: print("teardown ran"))
        sys.stdout.write("written before exit")  # no newline: only a flush gets it out
        exit_without_teardown(0)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stdout == "written before exit"
