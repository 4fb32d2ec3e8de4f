"""vLLM as the evaluation backend (optional extra `vllm`, GPU): fast generation for merged models.

vLLM builds its engine from a model directory and cannot adopt an in-memory transformers model,
so a merged model is written once to a RAM-backed directory (/dev/shm where it exists) as
safetensors, handed to lm-eval's `VLLM` wrapper, and removed afterwards. The save is timed and
reported so its cost is visible next to the evaluation time. Nothing here is imported unless the
backend is chosen, so the CPU-only install never needs vLLM.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_harness.core.errors import EvaluationError

RAM_DIRS = (Path("/dev/shm"),)


@dataclass
class VllmOptions:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.8
    dtype: str = "auto"
    max_model_len: int | None = None


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def staging_root() -> Path | None:
    """A RAM-backed directory for the hand-over copy, or None for the default temp dir."""
    return next((d for d in RAM_DIRS if d.is_dir()), None)


@contextmanager
def staged_model(model: Any, tokenizer: Any) -> Iterator[tuple[Path, float]]:
    """Write `model` + `tokenizer` to a temporary (RAM-backed) directory; yield (dir, seconds)."""
    root = staging_root()
    directory = Path(tempfile.mkdtemp(prefix="merge-harness-vllm-", dir=root))
    try:
        start = time.perf_counter()
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        yield directory, time.perf_counter() - start
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def vllm_lm(model_dir: Path, options: VllmOptions, batch_size: int | str, seed: int):
    """lm-eval's vLLM model over a model directory."""
    if not vllm_available():
        raise EvaluationError("backend 'vllm' needs the vllm extra: pip install 'merge-harness[vllm]'")
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(
        pretrained=str(model_dir),
        dtype=options.dtype,
        tensor_parallel_size=options.tensor_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization,
        max_model_len=options.max_model_len,
        batch_size=batch_size,
        seed=seed,
    )
