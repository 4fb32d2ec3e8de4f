"""`kill -9` during a merge leaves nothing behind for long: the next merge (or atomic write) into
the same folder removes the temp entries of writers that are gone, never those of live ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_harness.core.atomic import (
    GRACE_SECONDS,
    atomic_write_text,
    make_temp_dir,
    release,
    remove_stale_temps,
)
from merge_harness.merge.config import load_merge_config
from merge_harness.merge.engine import merge_to_disk
from tests.conftest import state_of

LAYERS = 4
HIDDEN = 512


def write_big_model(path: Path, seed: int) -> Path:
    """A Llama-shaped checkpoint of random tensors (~40 MB): big enough that a merge takes a moment."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (2048, HIDDEN), "lm_head.weight": (2048, HIDDEN),
              "model.norm.weight": (HIDDEN,)}
    for layer in range(LAYERS):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            shapes[f"model.layers.{layer}.{name}.weight"] = (HIDDEN, HIDDEN)
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            shapes[f"model.layers.{layer}.{name}.weight"] = (2 * HIDDEN, HIDDEN)
        shapes[f"model.layers.{layer}.mlp.down_proj.weight"] = (HIDDEN, 2 * HIDDEN)
    path.mkdir(parents=True)
    save_file({n: torch.randn(s, generator=generator) for n, s in shapes.items()}, path / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": LAYERS}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def merge_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big")
    models = [write_big_model(root / name, seed) for seed, name in enumerate(("base", "a", "b", "c"))]
    path = root / "ties.yaml"
    path.write_text(textwrap.dedent(f"""\
        method: ties
        base_model: {models[0]}
        models:
          - {{model: {models[1]}, parameters: {{density: 0.5}}}}
          - {{model: {models[2]}, parameters: {{density: 0.5}}}}
          - {{model: {models[3]}, parameters: {{density: 0.5}}}}
        """))
    return path


@pytest.fixture(scope="module")
def reference(merge_yaml, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference") / "out"
    merge_to_disk(load_merge_config(merge_yaml), out, max_shard_bytes=4_000_000, show_progress=False)
    return state_of(out)


def start_merge(merge_yaml: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "merge_harness", "merge", str(merge_yaml), str(out), "--quiet",
               "--max-shard-size", "4MB"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def temp_entries(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".")]


def wait_for_temp_dir(process: subprocess.Popen, parent: Path, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if found := temp_entries(parent):
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"no temp dir appeared (exit {process.poll()}): {process.stderr.read()!r}")


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.5, 1.0])
def test_a_killed_merge_is_cleaned_up_by_the_next_one(merge_yaml, reference, tmp_path, delay):
    out = tmp_path / "out"
    process = start_merge(merge_yaml, out)
    temp = wait_for_temp_dir(process, tmp_path)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # killed mid-merge, it left its temp dir and no output; killed later, the finished output only
    assert temp.exists() != out.exists()
    if delay == 0:
        assert temp.exists(), "the merge finished before it could be killed: make the models bigger"
    merge_to_disk(load_merge_config(merge_yaml), out, force=True, max_shard_bytes=4_000_000,
                  show_progress=False)
    assert temp_entries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    merged = state_of(out)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[name], tensor) for name, tensor in reference.items())


def test_the_cli_cleans_up_after_a_killed_merge(merge_yaml, reference, tmp_path):
    out = tmp_path / "out"
    process = start_merge(merge_yaml, out)
    temp = wait_for_temp_dir(process, tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert temp.exists()
    second = start_merge(merge_yaml, out)
    assert second.wait(timeout=300) == 0, second.stderr.read()
    assert temp_entries(tmp_path) == []
    merged = state_of(out)
    assert all(torch.equal(merged[name], tensor) for name, tensor in reference.items())


HOLD_TEMP_DIR = """
import sys, time
from pathlib import Path
from merge_harness.core.atomic import make_temp_dir
path, fd = make_temp_dir(Path(sys.argv[1]))
print(path, flush=True)
time.sleep(600)
"""


def make_old(path: Path) -> None:
    past = time.time() - 10 * GRACE_SECONDS
    os.utime(path, (past, past))


def test_a_live_writers_temp_dir_is_never_removed(merge_yaml, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TEMP_DIR, str(tmp_path / "out")],
                              stdout=subprocess.PIPE, text=True)
    try:
        live = Path(holder.stdout.readline().strip())
        make_old(live)  # even old: its lock is held
        assert remove_stale_temps(tmp_path) == []
        merge_to_disk(load_merge_config(merge_yaml), tmp_path / "out", show_progress=False)
        assert live.is_dir()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert remove_stale_temps(tmp_path) == [live]


def test_a_reused_pid_does_not_keep_a_dead_writers_temp_dir(tmp_path):
    """The pid in the name is alive (ours) but nobody holds the lock: stale once past the grace."""
    pid = os.getpid()
    young = tmp_path / f".out.tmp-{pid}-young"
    old = tmp_path / f".out.tmp-{pid}-old"
    legacy = tmp_path / f".out.tmp-{pid}"  # the old format: no lock file at all
    for path in (young, old, legacy):
        path.mkdir()
    (young / ".lock").touch()
    (old / ".lock").touch()
    make_old(old)
    make_old(legacy)
    assert sorted(remove_stale_temps(tmp_path)) == sorted([old, legacy])
    assert young.is_dir()  # may be a writer that has not taken its lock yet


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_atomic_writes_remove_stale_temp_files_only(tmp_path):
    gone = dead_pid()
    stale_file = tmp_path / f".report.md.tmp-{gone}-abc123.tmp"
    stale_dir = tmp_path / f".model.tmp-{gone}-xyz"
    stale_file.write_text("half a report")
    stale_dir.mkdir()
    own, fd = make_temp_dir(tmp_path / "other")  # live and locked
    unrelated = [tmp_path / ".hidden", tmp_path / ".cfg.tmp-build", tmp_path / "keep.tmp"]
    for path in unrelated:
        path.write_text("not ours")
    old_copy = tmp_path / f".gone.old-{gone}"  # killed between replace_dir's renames: the only copy
    old_copy.mkdir()
    try:
        atomic_write_text(tmp_path / "summary.md", "done\n")
        assert not stale_file.exists() and not stale_dir.exists()
        assert own.is_dir() and old_copy.is_dir() and all(p.exists() for p in unrelated)
        assert (tmp_path / "summary.md").read_text() == "done\n"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".summary")]
        assert leftovers == []
    finally:
        release(fd)
