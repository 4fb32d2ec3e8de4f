"""Shared fixtures: tiny Llama checkpoints written as real safetensors model directories."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import textwrap  # noqa: E402

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
def ci_zoo(tmp_path_factory):
    """The demo's toy zoo at size `ci` (built once per session): (zoo, seconds it took)."""
    import time

    from merge_harness.zoo.zoos import build_zoo

    root = tmp_path_factory.mktemp("zoos")
    started = time.perf_counter()
    zoo = build_zoo(root, size="ci", seed=0, show_progress=False)
    return zoo, time.perf_counter() - started


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


@pytest.fixture(scope="session")
def chat_zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with a real trained tokenizer, and two perturbed 'fine-tunes' of it."""
    from merge_harness.zoo.toymodel import tiny_llama, train_tokenizer

    root = tmp_path_factory.mktemp("chat_zoo")
    corpus = [f"Question: what is {a} plus {b}? Answer: #### {a + b}" for a in range(30) for b in range(5)]
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    base = tiny_llama(tokenizer, hidden_size=32, layers=2, intermediate=64, seed=0)
    zoo = {}
    for name, noise in (("base", 0.0), ("math", 0.05), ("qa", 0.05)):
        model = tiny_llama(tokenizer, hidden_size=32, layers=2, intermediate=64, seed=0)
        if noise:
            generator = torch.Generator().manual_seed(len(name))
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(noise * torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        zoo[name] = root / name
    del base
    return zoo


def write_experiment(path: Path, zoo: dict[str, Path], store: Path, methods: str | None = None) -> Path:
    methods = methods or textwrap.dedent(
        """\
          - method: task_arithmetic
            grid: {lambda: [0.5, 1.0]}
          - method: ties
            parameters: {density: 0.5}
        """
    )
    path.write_text(
        textwrap.dedent(
            f"""\
            name: runner-test
            base_model: {zoo["base"]}
            finetunes:
              math: {{model: {zoo["math"]}, task: gsm8k_fixture}}
              qa: {{model: {zoo["qa"]}, task: cosmos_qa_fixture}}
            methods:
            """
        )
        + textwrap.indent(methods, "")
        + textwrap.dedent(
            f"""\
            tasks: [{", ".join(RUNNER_TASKS)}]
            evaluation: {{limit: 2, gen_kwargs: {{max_gen_toks: 8}}}}
            store: {store}
            """
        )
    )
    return path


RUNNER_TASKS = ["gsm8k_fixture", "cosmos_qa_fixture"]
