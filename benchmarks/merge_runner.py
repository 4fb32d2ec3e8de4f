"""Run one merge in this process and print one JSON line: its wall time and peak RSS.

The benchmark starts this script as a child process per merge, so that its peak resident set
(VmHWM, `merge_harness.core.allocator.peak_rss_mb`) belongs to exactly one merge:

    python benchmarks/merge_runner.py {ours|mergekit} CONFIG.json OUT_DIR [--shard-bytes N]
                                      [--threads N] [--profile STATS_FILE]

CONFIG.json is a mergekit-format merge config (both engines read it unchanged). Imports happen
before the clock starts, so `merge_s` is the merge itself and `import_s` the start-up cost;
`cpu_s` its CPU time (user + system, all threads); `rss_after_import_mb` is the resident set of
the interpreter with torch and the engine loaded, before any tensor is read. With `--profile`,
the merge runs under cProfile and the stats are dumped to STATS_FILE (read them with
`python -m pstats STATS_FILE`).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import time
from pathlib import Path

from merge_harness.core.allocator import keep_freed_memory, peak_rss_mb

DEFAULT_SHARD_BYTES = 2 * 1024**3  # our default; the 135M output (~540 MB) is one shard either way


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ours(config: dict, out_dir: Path, shard_bytes: int):
    from merge_harness.merge.config import MergeConfig
    from merge_harness.merge.engine import merge_to_disk

    keep_freed_memory()  # as `merge-harness merge` does

    def merge() -> None:
        merge_to_disk(
            MergeConfig.model_validate(config),
            out_dir,
            force=True,
            max_shard_bytes=shard_bytes,
            show_progress=False,
        )

    return merge


def mergekit(config: dict, out_dir: Path, shard_bytes: int):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    # As `mergekit-yaml CONFIG OUT --out-shard-size N --no-copy-tokenizer` on CPU (lazy_unpickle
    # and every other option at its default), without the model card.
    options = MergeOptions(
        copy_tokenizer=False, write_model_card=False, quiet=True, out_shard_size=shard_bytes
    )

    def merge() -> None:
        run_merge(MergeConfiguration.model_validate(config), str(out_dir), options)

    return merge


ENGINES = {"ours": ours, "mergekit": mergekit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=sorted(ENGINES))
    parser.add_argument("config", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    import torch  # counted in import_s, as every import of the engines

    if args.threads:
        torch.set_num_threads(args.threads)
    merge = ENGINES[args.engine](json.loads(args.config.read_text()), args.out_dir, args.shard_bytes)
    import_s = time.perf_counter() - start
    rss_after_import = peak_rss_mb()
    profiler = cProfile.Profile() if args.profile else None
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if profiler:
        profiler.runcall(merge)
        profiler.dump_stats(str(args.profile))
    else:
        merge()
    merge_s, cpu_s = time.perf_counter() - start, cpu_seconds() - cpu_start
    result = {
        "engine": args.engine,
        "merge_s": round(merge_s, 3),
        "cpu_s": round(cpu_s, 3),
        "import_s": round(import_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_import_mb": round(rss_after_import, 1),
        "load_1min": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
