"""vLLM as the evaluation backend (optional extra `vllm`, GPU): one engine per run, weights swapped in.

vLLM builds its engine from a model directory and cannot adopt an in-memory transformers model.
`VllmEngine` builds one engine for the first model of a run: the model is written once to a
RAM-backed directory (/dev/shm where it exists) as safetensors and handed to lm-eval's `VLLM`
wrapper; the directory lives as long as the engine. A later model with the same config, tensor
shapes and dtypes, tokenizer and engine settings (`engine_key`) is swapped into it in place:

1. `pack_for_vllm` maps its tensors onto vLLM's parameters (fused qkv_proj, gate_up_proj);
2. they go to one safetensors file in RAM, and `llm.collective_rpc("merge_harness_load_packed",
   args=(path,))` copies them into the worker's parameters: `WeightSwapExtension`, installed with
   `LLM(worker_extension_cls=...)` (vLLM's supported route for custom worker calls). An older vLLM
   without worker extensions, whose engine runs in this process, gets the same copy on its driver
   worker's model (`llm.llm_engine.model_executor.driver_worker.model_runner.model`);
3. `llm.reset_prefix_cache()`, so no KV block computed with the previous weights is reused.

Anything else builds a fresh engine, and the log says why: a different key, tensor_parallel_size
above 1 (each worker holds shards, which the packed copy does not cut), or a vLLM with neither
route. The seconds to build or swap are reported as the backend's setup time. The engine's
sampling RNG is seeded when it is built, not per model: greedy and log-likelihood tasks do not
depend on it. Nothing here imports vLLM unless the backend is chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_harness.core.errors import EvaluationError
from merge_harness.evaluate.vllm_weights import copy_packed_weights, pack_for_vllm, write_packed_file

logger = logging.getLogger(__name__)

RAM_DIRS = (Path("/dev/shm"),)
WORKER_EXTENSION = "merge_harness.evaluate.vllm_weights.WeightSwapExtension"
SWAP_METHOD = "merge_harness_load_packed"  # WeightSwapExtension's one method
INSTALL_HINT = "backend 'vllm' needs the vllm extra: pip install 'merge-harness[vllm]'"


@dataclass(frozen=True)
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


def accepts_worker_extension() -> bool:
    """Whether this vLLM takes `worker_extension_cls` (the methods `collective_rpc` can call)."""
    from vllm.engine.arg_utils import EngineArgs

    return "worker_extension_cls" in {field.name for field in dataclasses.fields(EngineArgs)}


def vllm_lm(model_dir: Path, options: VllmOptions, batch_size: int | str, seed: int):
    """lm-eval's vLLM model over a model directory, with our worker extension where vLLM takes one."""
    if not vllm_available():
        raise EvaluationError(INSTALL_HINT)
    from lm_eval.models.vllm_causallms import VLLM

    extension = {"worker_extension_cls": WORKER_EXTENSION} if accepts_worker_extension() else {}
    return VLLM(
        pretrained=str(model_dir),
        dtype=options.dtype,
        tensor_parallel_size=options.tensor_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization,
        max_model_len=options.max_model_len,
        batch_size=batch_size,
        seed=seed,
        **extension,  # lm-eval passes extra keyword arguments on to vllm.LLM
    )


# ----------------------------------------------------------------------------- what an engine fits


def engine_key(model: Any, tokenizer: Any, options: VllmOptions, batch_size: int | str, seed: int) -> str:
    """Everything a built engine depends on except the values of the weights: the config (minus
    bookkeeping keys), tensor names, shapes and dtypes, the tokenizer and the engine settings."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}
    tensors = {name: [list(t.shape), str(t.dtype)] for name, t in model.state_dict().items()}
    payload = [config, tensors, tokenizer_fingerprint(tokenizer), dataclasses.asdict(options),
               str(batch_size), seed]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer as lm-eval's wrapper and vLLM load it from the staged directory."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: the whole pipeline
    if backend is not None:
        vocabulary = backend.to_str()
    else:
        vocabulary = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
             getattr(tokenizer, "special_tokens_map", None)]
    return hashlib.sha256((vocabulary + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()


def next_step(built_for: str | None, key: str, can_swap: bool) -> str:
    """'swap' the weights into the engine in place (same key), else 'build' a fresh one.

    Even the model the engine already holds is swapped in again: it may have been written in
    place since (a run's merges reuse one model object), which nothing cheap detects reliably.
    """
    return "swap" if built_for == key and can_swap else "build"


# ----------------------------------------------------------------------------- the engine


class VllmEngine:
    """One vLLM engine for a sequence of models (a run): built for the first, later ones swapped in.

    `lm_for` returns lm-eval's `VLLM` with the given model's weights in the engine, and the
    seconds that took; `close` shuts the engine down and removes its staged directory.
    `options`: this engine's settings, in place of those `lm_for` is given (the evaluator's).
    """

    def __init__(self, options: VllmOptions | None = None) -> None:
        self.options = options
        self.lm: Any = None  # lm-eval's VLLM; `self.lm.model` is vLLM's LLM
        self.key: str | None = None  # engine_key of the model the engine was built for
        self.route: str | None = None  # "rpc" | "driver"; None: no in-place swap, rebuild instead
        self.builds = self.swaps = 0
        self._staging = contextlib.ExitStack()

    def lm_for(self, model: Any, tokenizer: Any, options: VllmOptions, batch_size: int | str,
               seed: int) -> tuple[Any, float]:
        if not vllm_available():
            raise EvaluationError(INSTALL_HINT)
        start = time.perf_counter()
        options = self.options or options
        key = engine_key(model, tokenizer, options, batch_size, seed)
        if next_step(self.key, key, self.route is not None) == "swap":
            try:
                self._swap_in(model)
                return self.lm, time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - a refused swap falls back to a fresh engine
                logger.warning("vLLM: in-place weight swap failed (%s); building a fresh engine", exc)
                self.key = None
        self._build(model, tokenizer, options, batch_size, seed, key)
        return self.lm, time.perf_counter() - start

    def _build(self, model: Any, tokenizer: Any, options: VllmOptions, batch_size: int | str,
               seed: int, key: str) -> None:
        if self.lm is not None and self.key is not None:
            why = ("no in-place weight swap with this vLLM / tensor_parallel_size" if key == self.key
                   else "the model's config, shapes, tokenizer or the engine settings differ")
            logger.warning("vLLM: building a fresh engine (%s)", why)
        self.close()
        try:
            directory, _ = self._staging.enter_context(staged_model(model, tokenizer))
            self.lm = vllm_lm(directory, options, batch_size, seed)
        except BaseException:
            self.close()
            raise
        self.key, self.route = key, swap_route(self.lm.model, options)
        self.builds += 1
        logger.info("vLLM: engine built (weight swap route: %s)", self.route or "none, rebuild per model")

    def _swap_in(self, model: Any) -> None:
        packed = pack_for_vllm(model.state_dict(), model.config.to_dict())
        expected, llm = len(packed), self.lm.model
        if self.route == "rpc":
            with tempfile.TemporaryDirectory(prefix="merge-harness-vllm-swap-", dir=staging_root()) as tmp:
                path = write_packed_file(packed, Path(tmp) / "model.safetensors")
                del packed  # the file holds them now
                copied = llm.collective_rpc(SWAP_METHOD, args=(str(path),))
        else:
            copied = [copy_packed_weights(driver_model(llm), packed)]
        if any(count != expected for count in copied):
            raise EvaluationError(f"vLLM weight swap: workers copied {copied} tensors, expected {expected}")
        reset_prefix_cache(llm)
        self.swaps += 1
        logger.info("vLLM: weights swapped in place (%d tensors)", expected)

    def close(self) -> None:
        if self.lm is not None:
            llm, self.lm = self.lm.model, None
            try:
                shutdown(llm)
            except Exception as exc:  # noqa: BLE001 - e.g. at exit, after vLLM's own handlers ran
                logger.debug("vLLM: engine shutdown failed: %s", exc)
        self._staging.close()
        self._staging = contextlib.ExitStack()
        self.key = self.route = None


# ----------------------------------------------------------------------------- vLLM's side


def swap_route(llm: Any, options: VllmOptions) -> str | None:
    """How weights reach this engine's model: our worker extension, the in-process driver, or None."""
    if options.tensor_parallel_size != 1:
        return None
    if accepts_worker_extension() and hasattr(llm, "collective_rpc"):
        return "rpc"
    return "driver" if driver_model(llm) is not None else None


def driver_model(llm: Any) -> Any:
    """The model of an in-process driver worker (vLLM's V0 engine), or None."""
    worker = getattr(getattr(getattr(llm, "llm_engine", None), "model_executor", None), "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # a WorkerWrapperBase holds the worker
    return getattr(getattr(worker, "model_runner", None), "model", None)


def reset_prefix_cache(llm: Any) -> None:
    """Drop cached KV blocks: they were computed with the previous weights."""
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is not None and reset() is False:
        raise EvaluationError("vLLM did not reset its prefix cache after a weight swap, so the previous "
                              "model's cached KV could be reused; evaluate with a fresh engine")


def shutdown(llm: Any) -> None:
    """Stop an engine and free its GPU memory (V1: its engine-core process)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if hasattr(core, "shutdown"):
        core.shutdown()
    del llm, core
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
