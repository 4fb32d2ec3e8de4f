"""Model references and in-memory models: HF ids or local dirs in, transformers models out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from merge_harness.core.errors import CheckpointError


class ModelNotFound(CheckpointError):
    """A hub id that is neither cached here nor reachable (a missing local path is a plain
    `CheckpointError`): `run --dry-run` then validates the config without the weights."""


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block on `count` torch CPU threads (None: leave torch's setting alone).

    Tiny models run several times faster on one thread than on two on these CPUs (the thread
    hand-offs cost more than the matrix products), and one thread also makes trained weights
    independent of the machine's core count.
    """
    if count is None:
        yield
        return
    if count < 1:
        raise ValueError(f"threads must be >= 1, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve_model(ref: str) -> Path:
    """A local model directory, or a Hugging Face id (`org/name` or `org/name@revision`).

    Hub models go through the local HF cache; offline (HF_HUB_OFFLINE=1) a model that is not
    cached fails at once with a message saying so instead of hanging on the network.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{ref} is a file, not a model directory")
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise CheckpointError(f"{ref}: model directory not found")
    from huggingface_hub import snapshot_download

    repo_id, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=WEIGHT_PATTERNS))
    except Exception as exc:
        raise ModelNotFound(
            f"{ref}: not a local directory and not available from the Hugging Face hub or its "
            f"cache ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def build_model(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]):
    """A transformers model from a config dict and a state dict, without touching disk.

    The model is created on the meta device and the merged tensors are assigned as its
    parameters, so no second copy of the weights is ever allocated.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    config.pop("quantization_config", None)
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = model.load_state_dict(dict(state), strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"merged weights do not fit {model_type}: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    if tied:
        model.tie_weights()
    _materialize_buffers(model)
    return model.eval()


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights by checkpoint name, each storage once: a tied lm_head is not listed
    apart from the embedding it shares (as a checkpoint of a tied model does not store it)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
    return tensors


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (e.g. rotary `inv_freq`) are computed, not stored: they were made
    on the meta device, so rebuild each such module from its config on the CPU and take its buffers.
    """
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if not hasattr(module, "config"):
            raise CheckpointError(f"cannot rebuild buffers {meta} of {type(module).__name__}")
        fresh = type(module)(module.config)
        for name in meta:
            setattr(module, name, getattr(fresh, name))
        for attr, value in vars(fresh).items():
            if not attr.startswith("_") and isinstance(value, float):
                setattr(module, attr, value)


def load_pretrained(path: str | Path):
    """A model directory as an eval-mode float32 transformers model."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load model: {exc}".splitlines()[0]) from exc


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load tokenizer: {exc}") from exc
