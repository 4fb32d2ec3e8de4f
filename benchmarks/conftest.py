"""Benchmark fixtures: a SmolLM2-135M-shaped base with three fine-tunes, and the results table.

The four checkpoints (random weights, float32 safetensors, ~540 MB each) are written once into
`benchmarks/.cache/` and reused by later sessions; delete that folder to rebuild them. Each
benchmark adds a row to `MergeResults`; at the end of the session the table is written to
`benchmarks/results/merge_speed.json` (`merge_speed_threads<N>.json` with MERGE_BENCH_THREADS=N)
and printed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

BENCH_DIR = Path(__file__).parent
CACHE_DIR = Path(os.environ.get("MERGE_BENCH_CACHE", BENCH_DIR / ".cache"))
# One file per thread setting, so a steadier MERGE_BENCH_THREADS=1 run does not replace the default.
_THREADS = os.environ.get("MERGE_BENCH_THREADS")
RESULTS_NAME = f"merge_speed_threads{_THREADS}.json" if _THREADS else "merge_speed.json"
RESULTS_FILE = BENCH_DIR / "results" / RESULTS_NAME

# HuggingFaceTB/SmolLM2-135M's config.json (the architecture only; the weights here are random).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)
FINETUNES = 3
NOISE = 0.01  # a fine-tune is base + NOISE * N(0, 1), tensor by tensor
ZOO_VERSION = "smollm2-135m-random-v1"  # bump when the recipe above changes


def _write_base(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.float32).save_pretrained(path)


def _write_finetune(base: Path, path: Path, seed: int) -> None:
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    state = load_file(base / "model.safetensors")
    for tensor in state.values():  # (*S) float32, in place: one model in memory at a time
        tensor.add_(torch.randn(tensor.shape, generator=generator), alpha=NOISE)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy2(base / "config.json", path / "config.json")


def build_zoo(root: Path) -> dict[str, Path]:
    """{'base', 'ft0', 'ft1', 'ft2'} -> model dirs under `root`, built unless already complete."""
    zoo = {"base": root / "base", **{f"ft{i}": root / f"ft{i}" for i in range(FINETUNES)}}
    if (root / ".complete").exists():
        return zoo
    shutil.rmtree(root, ignore_errors=True)
    _write_base(zoo["base"])
    for index in range(FINETUNES):
        _write_finetune(zoo["base"], zoo[f"ft{index}"], seed=index + 1)
    (root / ".complete").write_text(json.dumps(SMOLLM2_135M, indent=2) + "\n")
    return zoo


def warm_page_cache(paths: list[Path]) -> None:
    """Read every weight file once, so neither engine pays for the first read from disk."""
    for path in paths:
        for file in path.glob("*.safetensors"):
            with file.open("rb") as handle:
                while handle.read(64 * 1024**2):
                    pass


@pytest.fixture(scope="session")
def zoo_135m() -> dict[str, Path]:
    zoo = build_zoo(CACHE_DIR / ZOO_VERSION)
    warm_page_cache(list(zoo.values()))
    return zoo


def perturbed(base: Path, out: Path, seed: int) -> Path:
    """A stand-in fine-tune: seeded noise on the attention and MLP weights of the real model."""
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(base / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if ".self_attn." in name or ".mlp." in name:
            tensor.add_(torch.randn(tensor.shape, generator=generator), alpha=0.002)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for extra in base.iterdir():
        if extra.suffix in {".json", ".jinja"}:
            (out / extra.name).write_bytes(extra.read_bytes())
    return out


CALIBRATION_TASKS = ("math", "code", "qa")  # toy task generators standing in for the paper's data


def calibration_file(root: Path, task: str, rows: int) -> Path:
    """`rows` of the toy zoo's synthetic prompt/response pairs for `task`, written once."""
    from merge_harness.zoo.toytasks import train_pairs

    path = root / f"{task}_pairs_{rows}.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(pair) + "\n" for pair in train_pairs(task, rows, seed=1)))
    return path


def smollm2_entries(rows: int) -> tuple[Path, list[dict]]:
    """The real SmolLM2-135M and one `perturbed` fine-tune per calibration task, as merge-config
    entries with their calibration files."""
    from merge_harness.zoo.smollm2 import convert_smollm2

    root = CACHE_DIR / "slta-smollm2"
    base = convert_smollm2()
    models = [perturbed(base, root / f"ft_{task}", seed) for seed, task in enumerate(CALIBRATION_TASKS, 1)]
    entries = [{"model": str(model), "calibration": str(calibration_file(root, task, rows))}
               for model, task in zip(models, CALIBRATION_TASKS)]
    return base, entries


def run_merge_child(config: dict, out: Path, threads: int | None = None, keep: bool = False) -> dict:
    """One merge of ours in a fresh interpreter (`merge_runner.py`): its JSON line. The output
    directory is removed afterwards unless `keep`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    config_file = out.with_suffix(".json")
    config_file.write_text(json.dumps(config))
    command = [sys.executable, str(BENCH_DIR / "merge_runner.py"), "ours", str(config_file), str(out)]
    command += ["--threads", str(threads)] if threads else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"merge failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ results table


def machine() -> dict:
    """What the figures were measured on: CPU, cores, RAM, library versions."""
    from importlib.metadata import version

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {
        "code": _code_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "torch_default_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": version("mergekit"),
        "safetensors": version("safetensors"),
    }


def _code_version() -> str:
    """The commit measured, marked dirty when the merge path (harness/, merges/) has edits."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=BENCH_DIR.parent, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "harness", "merges") else "")


@dataclass
class MergeResults:
    rows: list[dict] = field(default_factory=list)
    load_start: tuple[float, float, float] = field(default_factory=os.getloadavg)

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def write(self, path: Path = RESULTS_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "machine": machine(),
            "load_average_start": [round(x, 2) for x in self.load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "rows": self.rows,
        }
        path.write_text(json.dumps(document, indent=2) + "\n")

    def table(self) -> str:
        header = (
            f"{'method':<30}{'ours s':>9}{'mk s':>9}{'ratio':>7}{'target':>8}{'cpu r':>7}"
            f"{'ours MB':>9}{'mk MB':>9}{'ratio':>7}{'target':>8}{'load':>7}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            lines.append(
                f"{r['method']:<30}{r['ours_s']:>9.2f}{r['mergekit_s']:>9.2f}{r['time_ratio']:>7.2f}"
                f"{_target(r['time_target']):>8}{r['cpu_ratio']:>7.2f}{r['ours_peak_rss_mb']:>9.0f}"
                f"{r['mergekit_peak_rss_mb']:>9.0f}{r['rss_ratio']:>7.2f}"
                f"{_target(r['rss_target']):>8}{r['load_1min_median']:>7.2f}"
            )
        return "\n".join(lines)


def _target(target: float | None) -> str:
    return "-" if target is None else f"<={target:g}"


@pytest.fixture(scope="session")
def merge_results(request) -> MergeResults:
    results = MergeResults()
    request.config.stash[RESULTS_KEY] = results
    yield results
    if results.rows:
        results.write()


RESULTS_KEY = pytest.StashKey[MergeResults]()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    results = config.stash.get(RESULTS_KEY, None)
    if results is None or not results.rows:
        return
    terminalreporter.section("merge speed: ours vs mergekit (medians; ratio = ours / mergekit)")
    terminalreporter.write_line(
        "s: merge wall time; cpu r: CPU-time ratio; MB: peak RSS of the merge's process"
    )
    terminalreporter.write_line(results.table())
    terminalreporter.write_line(f"written to {RESULTS_FILE.relative_to(BENCH_DIR.parent)}")
