"""Our tensor names -> vLLM's parameters, and the in-place copy that swaps a model into an engine.

vLLM's Llama-family models (`LlamaForCausalLM`, which also serves Mistral, and `Qwen2ForCausalLM`)
fuse projections that transformers keeps apart. Their `stacked_params_mapping` (vLLM
`vllm/model_executor/models/llama.py`, `LlamaModel.load_weights`) loads

    q_proj, k_proj, v_proj  ->  self_attn.qkv_proj   (shards "q", "k", "v")
    gate_proj, up_proj      ->  mlp.gate_up_proj     (shards 0, 1)

and at tensor_parallel_size 1 `QKVParallelLinear` / `MergedColumnParallelLinear` hold the shards
stacked along the output dimension (dim 0 of the weight, the only dimension of a bias) in that
order, so for an input x (tokens x hidden):

    x @ qkv_proj.weight.T  = [q | k | v]      q: heads * head_dim columns, k and v: kv_heads * head_dim
    x @ gate_up_proj.weight.T = [gate | up]   intermediate_size columns each

Every other tensor keeps its name. With `tie_word_embeddings` vLLM ties `lm_head` to
`model.embed_tokens` (its `named_parameters()` then lists the embedding only), so `lm_head.weight`
is dropped, after checking it equals the embedding. `VocabParallelEmbedding` pads the vocabulary
to a multiple of 64 rows: the copy fills the real rows and zeroes the padding, as vLLM's own
loader does.

`pack_for_vllm` is a pure function (no vLLM import); `copy_packed_weights` takes any module with
`named_parameters()`. `WeightSwapExtension` is the worker extension (`LLM(worker_extension_cls=...)`)
through which `LLM.collective_rpc` runs that copy inside vLLM's worker process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_harness.core.errors import EvaluationError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# vLLM parameter -> the transformers projections stacked in it, in vLLM's shard order
PACKED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
PART_OF = {part: packed for packed, parts in PACKED.items() for part in parts}
LAYER_TENSORS = {  # per-layer tensors vLLM loads under their own names
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias",
}
MODEL_TENSORS = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # vLLM pads their rows
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
SKIPPED = ("rotary_emb.inv_freq",)  # buffers older transformers saved; vLLM skips them too


@dataclass(frozen=True)
class Layout:
    """The shapes vLLM builds for one config (tensor_parallel_size 1)."""

    architecture: str
    layers: int
    hidden: int
    q_rows: int  # heads * head_dim
    kv_rows: int  # kv_heads * head_dim
    intermediate: int
    tied: bool

    def rows(self, part: str) -> int:
        """Output rows of one unfused projection, e.g. 'self_attn.k_proj'."""
        return {"q_proj": self.q_rows, "k_proj": self.kv_rows, "v_proj": self.kv_rows}.get(
            part.rsplit(".", 1)[-1], self.intermediate
        )


def layout_of(config: Mapping) -> Layout:
    """The layout of a transformers config dict; an unsupported architecture is a clear error.

    `architectures` is empty in the config of a model built in memory: its model_type decides.
    """
    architectures = config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"), "")]
    known = [a for a in architectures if a in ARCHITECTURES]
    if not known:
        given = config.get("architectures") or config.get("model_type")
        raise EvaluationError(
            f"vLLM weight swap: architecture {given!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)}); use a fresh engine per model"
        )
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return Layout(
        architecture=known[0],
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        q_rows=heads * head_dim,
        kv_rows=config.get("num_key_value_heads", heads) * head_dim,
        intermediate=config["intermediate_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def pack_for_vllm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A transformers state dict in vLLM's parameter layout (names, fused q/k/v and gate/up)."""
    layout = layout_of(config)
    groups: dict[str, dict[str, torch.Tensor]] = {}  # packed name -> {part name: tensor}
    packed: dict[str, torch.Tensor | None] = {}  # insertion order; None until a group is stacked
    for name, tensor in state.items():
        if name.endswith(SKIPPED) or (name == "lm_head.weight" and layout.tied):
            continue
        target = _packed_name(name, layout)
        if target == name:
            packed[name] = tensor
            continue
        _check_part(name, tensor, layout)
        groups.setdefault(target, {})[name] = tensor
        packed.setdefault(target, None)
    if layout.tied:
        _check_tied(state)
    for target, parts in groups.items():
        packed[target] = _stack(target, parts)
    return packed  # type: ignore[return-value]  # every None was replaced by its stacked group


def unpack_from_vllm(packed: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """The inverse of `pack_for_vllm`: transformers names, fused tensors split, lm_head re-tied."""
    layout = layout_of(config)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in packed.items():
        prefix, fused, suffix = _split_name(name)
        if fused not in PACKED:
            state[name] = tensor
            continue
        parts = PACKED[fused]
        for part, piece in zip(parts, torch.split(tensor, [layout.rows(p) for p in parts], dim=0)):
            state[f"{prefix}{part}.{suffix}"] = piece
    if layout.tied and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _split_name(name: str) -> tuple[str, str, str]:
    """'model.layers.3.self_attn.q_proj.weight' -> ('model.layers.3.', 'self_attn.q_proj', 'weight')."""
    match = LAYER_NAME.fullmatch(name)
    if not match:
        return "", name, ""
    return name[: match.start(2)], match.group(2), match.group(3)


def _packed_name(name: str, layout: Layout) -> str:
    """The vLLM parameter `name` goes into; an unknown tensor is an error naming it."""
    prefix, module, suffix = _split_name(name)
    if not prefix:
        if name in MODEL_TENSORS:
            return name
        raise EvaluationError(f"vLLM weight swap: tensor {name!r} is not part of the {layout.architecture} "
                              "layout vLLM loads (embed_tokens, layers.N.*, norm, lm_head)")
    index = int(prefix.split(".")[2])
    if index >= layout.layers:
        raise EvaluationError(f"vLLM weight swap: tensor {name!r}: layer {index} is beyond the "
                              f"config's num_hidden_layers={layout.layers}")
    if module in PART_OF:
        return f"{prefix}{PART_OF[module]}.{suffix}"
    if f"{module}.{suffix}" in LAYER_TENSORS:
        return name
    raise EvaluationError(f"vLLM weight swap: tensor {name!r} is not part of the {layout.architecture} "
                          "layer layout vLLM loads (q/k/v/o_proj, gate/up/down_proj, the two norms)")


def _check_part(name: str, tensor: torch.Tensor, layout: Layout) -> None:
    rows = layout.rows(_split_name(name)[1])
    expected = (rows, layout.hidden) if name.endswith(".weight") else (rows,)
    if tuple(tensor.shape) != expected:
        raise EvaluationError(f"vLLM weight swap: tensor {name!r} has shape {tuple(tensor.shape)}, "
                              f"expected {expected} from the config (heads, kv heads, intermediate size)")


def _check_tied(state: Mapping[str, torch.Tensor]) -> None:
    """With tied embeddings vLLM keeps one matrix: refuse an lm_head that is not the embedding."""
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is None or embed is None or head.data_ptr() == embed.data_ptr():
        return
    if head.shape != embed.shape or not torch.equal(head, embed):
        raise EvaluationError("vLLM weight swap: tensor 'lm_head.weight' differs from "
                              "'model.embed_tokens.weight' but the config sets tie_word_embeddings")


def _stack(target: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parts of one fused parameter, concatenated along dim 0 in vLLM's shard order."""
    prefix, fused, suffix = _split_name(target)
    names = [f"{prefix}{part}.{suffix}" for part in PACKED[fused]]
    missing = [name for name in names if name not in parts]
    if missing:
        raise EvaluationError(f"vLLM weight swap: tensor {missing[0]!r} is missing; vLLM's {target!r} "
                              f"stacks {', '.join(repr(n) for n in names)}")
    dtypes = {parts[name].dtype for name in names}
    if len(dtypes) > 1:
        raise EvaluationError(f"vLLM weight swap: the tensors stacked into {target!r} have different "
                              f"dtypes ({', '.join(sorted(map(str, dtypes)))})")
    return torch.cat([parts[name] for name in names], dim=0)


# ----------------------------------------------------------------------------- in the engine


def copy_packed_weights(module: torch.nn.Module, packed: Mapping[str, torch.Tensor]) -> int:
    """Copy `packed` into `module`'s parameters in place (same storage: CUDA graphs stay valid).

    Everything is checked before anything is written: every parameter is covered (no weight of
    the previous model survives), every tensor names a parameter, and every shape matches (the
    vocabulary tensors may have padding rows, which are zeroed). Returns the tensors copied.
    """
    params = dict(module.named_parameters())
    uncovered = sorted(params.keys() - packed.keys())
    unknown = sorted(packed.keys() - params.keys())
    if uncovered or unknown:
        raise EvaluationError(
            "vLLM weight swap: the engine's model and the new weights differ in their tensors "
            f"(engine only: {uncovered[:3]}, new only: {unknown[:3]}); build a fresh engine"
        )
    for name, tensor in packed.items():
        _check_fits(name, tensor, params[name])
    with torch.no_grad():
        for name, tensor in packed.items():
            target = params[name].data
            if target.shape != tensor.shape:  # vocabulary padding rows (`_check_fits` allowed them)
                target[tensor.shape[0]:].zero_()
                target = target[: tensor.shape[0]]
            target.copy_(tensor)
    return len(packed)


def _check_fits(name: str, tensor: torch.Tensor, param: torch.Tensor) -> None:
    same = tuple(tensor.shape) == tuple(param.shape)
    padded = (name in VOCAB_TENSORS and tensor.dim() == 2 and param.dim() == 2
              and param.shape[1] == tensor.shape[1] and param.shape[0] >= tensor.shape[0])
    if not (same or padded):
        raise EvaluationError(f"vLLM weight swap: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                              f"engine's parameter {tuple(param.shape)}; build a fresh engine")


def write_packed_file(packed: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Save packed tensors as one safetensors file (CPU, contiguous) for the engine's worker."""
    from safetensors.torch import save_file

    save_file({name: t.detach().to("cpu").contiguous() for name, t in packed.items()}, str(path))
    return path


def load_packed_file(module: torch.nn.Module, path: str | Path) -> int:
    """`copy_packed_weights` from a file `write_packed_file` wrote (memory-mapped, read on the CPU)."""
    from safetensors.torch import load_file

    return copy_packed_weights(module, load_file(str(path), device="cpu"))


class WeightSwapExtension:
    """Mixed into vLLM's worker class by `LLM(worker_extension_cls=...)`, so that
    `llm.collective_rpc("merge_harness_load_packed", args=(path,))` runs in every worker.

    vLLM refuses an extension whose attribute names clash with the worker's, hence one method
    with a prefixed name. `self.model_runner.model` is where vLLM's own RLHF example
    (`examples/offline_inference/rlhf_utils.py`) reaches the worker's model.
    """

    def merge_harness_load_packed(self, path: str) -> int:
        return load_packed_file(self.model_runner.model, path)  # type: ignore[attr-defined]
