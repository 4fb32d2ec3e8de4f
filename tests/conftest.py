"""Shared fixtures: tiny Llama checkpoints written as real safetensors model directories."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def write_llama(
    path: Path,
    seed: int,
    base: dict[str, torch.Tensor] | None = None,
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """A random tiny Llama; with `base`, a 'fine-tune' = base + noise * N(0, 1) per tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    if base is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base[name] + noise * torch.randn(param.shape, generator=generator))
    model.to(dtype).save_pretrained(path)
    return path


def state_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict[str, Path]:
    """A base and three fine-tunes of it: {'base', 'ft0', 'ft1', 'ft2'} -> model dirs."""
    root = tmp_path_factory.mktemp("zoo")
    base = write_llama(root / "base", seed=0)
    base_state = state_of(base)
    zoo = {"base": base}
    for index in range(3):
        zoo[f"ft{index}"] = write_llama(root / f"ft{index}", seed=index + 1, base=base_state)
    return zoo
