"""Our tensors in vLLM's parameter layout, and the in-place swap of a model into an engine.

The reference is transformers itself: tiny Llama / Mistral / Qwen2 models (GQA: fewer key/value
heads than heads) whose projections, computed from the fused tensors the way vLLM's forward
splits them, must equal the models' own q/k/v and MLP modules. The in-place copy runs on a plain
torch module carrying vLLM's parameter names (`copy_packed_weights` takes any module). The
engine itself runs where vllm and a GPU are (the last test; benchmarks/vllm_check.py measures).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from merge_harness.core.errors import EvaluationError
from merge_harness.evaluate.vllm_backend import (
    VllmEngine,
    VllmOptions,
    engine_key,
    next_step,
    vllm_available,
)
from merge_harness.evaluate.vllm_weights import (
    WeightSwapExtension,
    copy_packed_weights,
    load_packed_file,
    pack_for_vllm,
    unpack_from_vllm,
    write_packed_file,
)

SHAPE = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
Q_ROWS, KV_ROWS, INTER = 4 * 8, 2 * 8, 48  # heads * head_dim, kv_heads * head_dim, intermediate


def tiny(kind: str = "llama", tied: bool = False, seed: int = 0):
    import transformers

    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SHAPE, tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    return model


def packed_of(model) -> dict[str, torch.Tensor]:
    return pack_for_vllm(model.state_dict(), model.config.to_dict())


def vllm_names(tied: bool, bias: bool = False) -> list[str]:
    """The parameters vLLM's LlamaForCausalLM / Qwen2ForCausalLM list, written out by hand."""
    names = ["model.embed_tokens.weight"]
    for i in range(2):
        layer = f"model.layers.{i}."
        names += [f"{layer}self_attn.qkv_proj.weight", *([f"{layer}self_attn.qkv_proj.bias"] if bias else []),
                  f"{layer}self_attn.o_proj.weight", f"{layer}mlp.gate_up_proj.weight",
                  f"{layer}mlp.down_proj.weight", f"{layer}input_layernorm.weight",
                  f"{layer}post_attention_layernorm.weight"]
    return [*names, "model.norm.weight", *([] if tied else ["lm_head.weight"])]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_fused_projections_compute_what_the_separate_modules_compute(kind):
    model = tiny(kind)
    packed = packed_of(model)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            name = f"model.layers.{i}."
            qkv = F.linear(x, packed[f"{name}self_attn.qkv_proj.weight"],
                           packed.get(f"{name}self_attn.qkv_proj.bias"))
            q, k, v = qkv.split([Q_ROWS, KV_ROWS, KV_ROWS], dim=-1)  # as vLLM's LlamaAttention.forward
            torch.testing.assert_close(q, layer.self_attn.q_proj(x))
            torch.testing.assert_close(k, layer.self_attn.k_proj(x))
            torch.testing.assert_close(v, layer.self_attn.v_proj(x))
            gate_up = F.linear(x, packed[f"{name}mlp.gate_up_proj.weight"])
            gate, up = gate_up[:, :INTER], gate_up[:, INTER:]  # as vLLM's SiluAndMul halves it
            mlp = F.linear(F.silu(gate) * up, packed[f"{name}mlp.down_proj.weight"])
            torch.testing.assert_close(mlp, layer.mlp(x))


@pytest.mark.parametrize(("kind", "tied"), [("llama", False), ("llama", True), ("qwen2", True)])
def test_names_are_vllms_parameters_and_a_tied_lm_head_is_dropped(kind, tied):
    assert list(packed_of(tiny(kind, tied))) == vllm_names(tied, bias=kind == "qwen2")


@pytest.mark.parametrize(("kind", "tied"), [("llama", False), ("mistral", True), ("qwen2", True)])
def test_unpacking_gives_back_every_tensor(kind, tied):
    model = tiny(kind, tied)
    state = model.state_dict()
    again = unpack_from_vllm(packed_of(model), model.config.to_dict())
    assert sorted(again) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(again[name], tensor), name


def renamed(state, old, new):
    return {new if name == old else name: tensor for name, tensor in state.items()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {**s, "model.layers.0.self_attn.rotary.weight": torch.ones(3)},
         "tensor 'model.layers.0.self_attn.rotary.weight' is not part of the LlamaForCausalLM layer layout"),
        (lambda s: {**s, "model.extra.weight": torch.ones(3)}, "tensor 'model.extra.weight' is not part"),
        (lambda s: {**s, "model.layers.0.self_attn.k_proj.weight": torch.ones(8, 32)},
         r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(8, 32\), expected \(16, 32\)"),
        (lambda s: {n: t for n, t in s.items() if n != "model.layers.1.self_attn.v_proj.weight"},
         "tensor 'model.layers.1.self_attn.v_proj.weight' is missing"),
        (lambda s: renamed(s, "model.layers.1.mlp.up_proj.weight", "model.layers.7.mlp.up_proj.weight"),
         "tensor 'model.layers.7.mlp.up_proj.weight': layer 7 is beyond"),
    ],
)
def test_an_unknown_or_misshapen_tensor_is_named_in_one_line(change, message):
    model = tiny()
    with pytest.raises(EvaluationError, match=message) as raised:
        pack_for_vllm(change(model.state_dict()), model.config.to_dict())
    assert "\n" not in str(raised.value)


def test_an_unsupported_architecture_or_an_untied_head_under_tie_is_refused():
    model = tiny(tied=True)
    with pytest.raises(EvaluationError, match="architecture \\['GPT2LMHeadModel'\\] is not supported"):
        pack_for_vllm(model.state_dict(), {**model.config.to_dict(), "architectures": ["GPT2LMHeadModel"]})
    state = {**model.state_dict(), "lm_head.weight": torch.zeros(50, 32)}
    with pytest.raises(EvaluationError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        pack_for_vllm(state, model.config.to_dict())


# ----------------------------------------------------------------------------- the in-place copy


def module_with(shapes: dict[str, tuple[int, ...]], tie: bool = False) -> torch.nn.Module:
    """A plain module whose parameters carry vLLM's names and shapes (filled with 7s)."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.full(shape, 7.0), requires_grad=False))
    if tie:  # as vLLM ties lm_head to the embedding: one Parameter, listed once
        root.add_module("lm_head", torch.nn.Module())
        root.lm_head.weight = root.model.embed_tokens.weight
    return root


def engine_model(packed, vocab_rows: int | None = None, tie: bool = False) -> torch.nn.Module:
    shapes = {name: tuple(t.shape) for name, t in packed.items()}
    if vocab_rows:  # VocabParallelEmbedding pads the vocabulary to a multiple of 64
        shapes["model.embed_tokens.weight"] = (vocab_rows, 32)
    return module_with(shapes, tie)


def test_copy_fills_every_parameter_in_place_and_zeroes_vocabulary_padding():
    packed = packed_of(tiny(tied=True))
    module = engine_model(packed, vocab_rows=64, tie=True)
    storage = {name: p.data_ptr() for name, p in module.named_parameters()}
    assert copy_packed_weights(module, packed) == len(packed)
    params = dict(module.named_parameters())
    assert sorted(params) == sorted(packed)  # the tied head is the embedding
    for name, tensor in packed.items():
        assert torch.equal(params[name][: tensor.shape[0]], tensor), name
        assert params[name].data_ptr() == storage[name]  # same storage: CUDA graphs stay valid
    assert torch.equal(params["model.embed_tokens.weight"][50:], torch.zeros(14, 32))
    assert module.lm_head.weight is module.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("extra", "shrink", "message"),
    [
        ({"model.layers.0.self_attn.attn.k_scale": (1,)}, None,
         r"engine only: \['model.layers.0.self_attn.attn.k_scale'\]"),
        ({}, "model.layers.1.mlp.gate_up_proj.weight",
         r"tensor 'model.layers.1.mlp.gate_up_proj.weight' has shape \(96, 32\), the engine's parameter"),
    ],
)
def test_copy_refuses_a_model_that_does_not_fit_and_writes_nothing(extra, shrink, message):
    packed = packed_of(tiny())
    shapes = {name: tuple(t.shape) for name, t in packed.items()} | extra
    if shrink:
        shapes[shrink] = (95, 32)
    module = module_with(shapes)
    with pytest.raises(EvaluationError, match=message):
        copy_packed_weights(module, packed)
    assert all(bool((p == 7).all()) for p in module.parameters())  # checked before any write


def test_packed_file_round_trip_into_the_engine_model(tmp_path):
    packed = packed_of(tiny("qwen2", tied=True))
    module = engine_model(packed, tie=True)
    path = write_packed_file(packed, tmp_path / "model.safetensors")
    assert load_packed_file(module, path) == len(packed)
    params = dict(module.named_parameters())
    for name, tensor in packed.items():
        assert torch.equal(params[name], tensor), name


def test_the_worker_extension_has_one_prefixed_method():
    """vLLM refuses an extension whose attribute names clash with its worker's."""
    assert [a for a in dir(WeightSwapExtension) if not a.startswith("__")] == ["merge_harness_load_packed"]


# ----------------------------------------------------------------------------- the engine's choices


def test_the_engine_swaps_only_into_an_engine_built_for_the_same_key():
    assert next_step(None, "a", can_swap=True) == "build"
    assert next_step("a", "a", can_swap=True) == "swap"
    assert next_step("a", "b", can_swap=True) == "build"
    assert next_step("a", "a", can_swap=False) == "build"


def test_engine_key_is_shared_by_fine_tunes_and_changes_with_what_the_engine_was_built_on(chat_zoo):
    from merge_harness.io.models import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(chat_zoo["base"])
    math, qa = load_pretrained(chat_zoo["math"]), load_pretrained(chat_zoo["qa"])
    key = engine_key(math, tokenizer, VllmOptions(), 8, 0)
    assert engine_key(qa, load_tokenizer(chat_zoo["qa"]), VllmOptions(), 8, 0) == key
    assert engine_key(qa, tokenizer, VllmOptions(), "auto", 0) != key
    assert engine_key(qa, tokenizer, VllmOptions(dtype="bfloat16"), 8, 0) != key
    assert engine_key(qa.to(torch.bfloat16), tokenizer, VllmOptions(), 8, 0) != key
    qa.config.rms_norm_eps *= 2
    assert engine_key(qa, tokenizer, VllmOptions(), 8, 0) != key
    tokenizer.chat_template = "{{ messages }}"
    assert engine_key(math, tokenizer, VllmOptions(), 8, 0) != key


@pytest.mark.skipif(vllm_available(), reason="vllm is installed: the error path cannot happen")
def test_the_vllm_backend_without_vllm_fails_clearly_before_any_staging(chat_zoo):
    from merge_harness.evaluate.evaluator import EvalSettings, evaluate
    from merge_harness.evaluate.vllm_backend import staging_root
    from merge_harness.io.models import load_pretrained

    root = staging_root()
    before = set(root.glob("merge-harness-vllm-*")) if root else set()
    with pytest.raises(EvaluationError, match="pip install 'merge-harness\\[vllm\\]'"):
        evaluate(load_pretrained(chat_zoo["math"]), chat_zoo["math"], ["gsm8k_fixture"],
                 EvalSettings(limit=1, backend="vllm"), engine=VllmEngine())
    assert (set(root.glob("merge-harness-vllm-*")) if root else set()) == before


@pytest.mark.skipif(not (vllm_available() and torch.cuda.is_available()), reason="needs vllm and a GPU")
def test_one_engine_swapped_between_models_scores_as_a_fresh_engine(chat_zoo):
    from merge_harness.evaluate.evaluator import EvalSettings, evaluate
    from merge_harness.io.models import load_pretrained

    settings = EvalSettings(limit=4, backend="vllm", batch_size="auto")
    shared, fresh = VllmEngine(), VllmEngine()
    try:
        math = load_pretrained(chat_zoo["math"])
        evaluate(math, chat_zoo["math"], ["cosmos_qa_fixture"], settings, engine=shared)
        qa = load_pretrained(chat_zoo["qa"])
        swapped = evaluate(qa, chat_zoo["qa"], ["cosmos_qa_fixture"], settings, engine=shared)
        assert (shared.builds, shared.swaps) == (1, 1)
        alone = evaluate(qa, chat_zoo["qa"], ["cosmos_qa_fixture"], settings, engine=fresh)
        assert swapped.scores == alone.scores
    finally:
        shared.close()
        fresh.close()
