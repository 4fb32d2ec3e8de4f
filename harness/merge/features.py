"""Layer-wise statistics of Llama-family decoders on calibration data, for model-level merges.

`LayerwiseFeatures` implements `merge_harness.merges.model_level.CalibrationInputs`. The base model
is built in memory when a statistics stream first needs it (SLTA, RegMean; Fisher never does) and
dropped as soon as that stream is exhausted; a fine-tune is never loaded whole for SLTA and
RegMean: layer i of fine-tune k is read from its checkpoint and run through the base model's
layer module with `torch.func.functional_call`. Fisher builds one fine-tune's network at a time
and squares each parameter's gradient as backward produces it, so no full set of gradients
exists besides the Fisher accumulator. Supported: Llama, Mistral, Qwen2 (`model.layers[i]` with
input_layernorm, self_attn, post_attention_layernorm, mlp, pre-norm residual blocks).

SLTA (Algorithm 1): the base model embeds each task's tokens; a forward pre-hook on layer 0
captures the layer's call kwargs (attention mask, rotary position embeddings) and stops the
forward. Then layer by layer: H^i_t is kept for every task t (one layer's activations x T);
per token chunk the base block output and each fine-tune's output on the *same* pre-trained
input give D_k = f(H; theta_k) - f(H; theta_0), handed to the method at non-padding positions;
H^{i+1}_t is the base layer output. Each model runs each layer once on each task's data: one
forward of every model per task's calibration set, counted in `forward_passes()`.

Blocks (`attn_mlp`): attention = self_attn(input_layernorm(h)) on the layer input h; MLP =
mlp(post_attention_layernorm(m)) on m = h + attention_0(h); both without the residual. `layer`:
the decoder layer's output (the residual cancels in D).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from merge_harness.core.allocator import return_free_memory
from merge_harness.core.errors import CheckpointError, MethodError
from merge_harness.io.checkpoint import Checkpoint
from merge_harness.merge.calibration_data import CalibrationSet
from merge_harness.merges.model_level import DeltaBatch, FeatureGranularity, LayerGrams, Submodule

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
BLOCKS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
EXPECTED = "model.layers[i].{input_layernorm, self_attn, post_attention_layernorm, mlp}"
LayerParams = dict[str, torch.Tensor] | None  # by name relative to the module; None: the base's


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(tensor-name prefix, layers) of a supported decoder, else an error naming what is expected."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    layers = getattr(getattr(model, "model", None), "layers", None)
    unsupported = f"architecture {model_type!r} is not supported by calibrated merges: they need a "
    expected = f"Llama-family decoder ({', '.join(SUPPORTED_MODEL_TYPES)}) with {EXPECTED}"
    if model_type not in SUPPORTED_MODEL_TYPES or not isinstance(layers, torch.nn.ModuleList):
        raise MethodError(unsupported + expected)
    for index, layer in enumerate(layers):
        children = {n for n, child in layer.named_children() if next(child.parameters(), None) is not None}
        missing, extra = set(BLOCKS) - children, children - set(BLOCKS)
        if missing or extra:
            raise MethodError(
                unsupported + expected + f"; layer {index} lacks {sorted(missing)} / has {sorted(extra)}"
            )
    if len({getattr(layer, "attention_type", None) for layer in layers}) > 1:
        raise MethodError(unsupported + "layers with different attention types (sliding/full)")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return prefix, layers


class _Captured(Exception):
    """Raised by the layer-0 pre-hook to stop the forward once its inputs are known."""


@dataclass
class Chunk:
    """A slice of one task's calibration set as it enters the current decoder layer."""

    hidden: torch.Tensor  # (b, L, d)
    valid: torch.Tensor  # (b, L) bool, False at padding
    input_ids: torch.Tensor  # (b, L)
    kwargs: dict[str, Any]  # the decoder-layer call kwargs (mask, position embeddings, ...)


def layer_inputs(model, first_layer, input_ids, attention_mask) -> tuple[torch.Tensor, dict]:
    """The hidden states and call kwargs layer 0 receives, without running any layer."""
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise MethodError("the model never called its first decoder layer")
    return captured["hidden"], captured["kwargs"]


def _call(module: torch.nn.Module, params: LayerParams, *args, **kwargs):
    out = module(*args, **kwargs) if params is None else functional_call(module, params, args, kwargs)
    return out[0] if isinstance(out, tuple) else out


def _part(params: LayerParams, child: str) -> LayerParams:
    if params is None:
        return None
    start = child + "."
    return {k[len(start):]: v for k, v in params.items() if k.startswith(start)}


def attention_block(layer, params: LayerParams, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    normed = _call(layer.input_layernorm, _part(params, "input_layernorm"), hidden)
    return _call(layer.self_attn, _part(params, "self_attn"), hidden_states=normed, **kwargs)


def mlp_block(layer, params: LayerParams, hidden: torch.Tensor) -> torch.Tensor:
    normed = _call(layer.post_attention_layernorm, _part(params, "post_attention_layernorm"), hidden)
    return _call(layer.mlp, _part(params, "mlp"), normed)


class LayerwiseFeatures:
    """The engine side of `CalibrationInputs`: base model in memory, fine-tunes read per layer.

    `model`: the reference model, or a function that builds it; a built one is dropped when the
    stream that needed it ends (a given model is kept: it is the caller's).
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        base: Checkpoint | None,
        models: Sequence[Checkpoint],
        data: Sequence[CalibrationSet],
        tasks: Sequence[str],
        names: Sequence[str],
        *,
        device: str = "cpu",
        batch_size: int = 8,
        advance: Callable[[], None] = lambda: None,
    ):
        self.base, self.models, self.data = base, list(models), list(data)
        self._tasks, self._names = tuple(tasks), list(names)
        self.device, self.batch_size, self.advance = device, batch_size, advance
        self.passes: Counter[tuple[str, str]] = Counter()  # (model, task) -> examples x layers
        self._build = None if isinstance(model, torch.nn.Module) else model
        self._model: torch.nn.Module | None = None
        self.num_layers = 0  # known once a model is built
        if self._build is None:
            self._use(model)

    # ----------------------------------------------------------------- the reference model
    def _use(self, model: torch.nn.Module) -> None:
        self._model = model
        self.prefix, self._layers = decoder_layers(model)
        self.num_layers = len(self._layers)

    def _reference(self) -> torch.nn.Module:
        if self._model is None:
            self._use(self._build())
        return self._model

    @property
    def model(self) -> torch.nn.Module:
        """The reference model, built on first use."""
        return self._reference()

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The reference model's decoder layers (building it on first use)."""
        self._reference()
        return self._layers

    def _release(self) -> None:
        """Drop a reference model built here (its layer modules too), once its stream is done."""
        if self._build is not None:
            self._model = self._layers = None
            return_free_memory()  # its pages, else resident through the merge that follows

    # ----------------------------------------------------------------------------- reading
    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def read(self, model: int | None, name: str) -> torch.Tensor:
        checkpoint = self.base if model is None else self.models[model]
        if checkpoint is None:
            raise MethodError("this method needs a base model (base_model: in the merge config)")
        tensor = checkpoint.read(name).to(self.device, torch.float32)
        # a cheap sum first; the exact elementwise check only when it is not finite
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{checkpoint.tensors[name].file}: tensor {name!r} contains NaN or inf")
        return tensor

    def fingerprint(self) -> str:
        """The checkpoints (path, size, mtime of each file) and the calibration tokens, hashed."""
        digest = hashlib.sha256()
        for checkpoint in [self.base, *self.models]:
            if checkpoint is not None:
                for file in sorted({info.file for info in checkpoint.tensors.values()}):
                    stat = Path(file).stat()
                    digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        for data in self.data:
            digest.update(data.input_ids.numpy().tobytes() + data.attention_mask.numpy().tobytes())
        digest.update(f"{self._tasks}{self.device}".encode())
        return digest.hexdigest()

    def layer_params(self, model: int, index: int) -> dict[str, torch.Tensor]:
        """Layer `index` of fine-tune `model`, keyed like the layer module's own parameters."""
        prefix = f"{self.prefix}.{index}."
        return {rel: self.read(model, prefix + rel) for rel, _ in self.layers[index].named_parameters()}

    def forward_passes(self) -> dict[str, float]:
        """Full-forward equivalents per 'model@task' (1.0 = one forward of that calibration set)."""
        sizes = dict(zip(self._tasks, (d.num_examples for d in self.data)))
        layers = self.num_layers or 1
        return {f"{m}@{t}": n / (sizes[t] * layers) for (m, t), n in sorted(self.passes.items())}

    def _count(self, model: str, task: int, examples: int) -> None:
        self.passes[(model, self._tasks[task])] += examples

    # --------------------------------------------------------------------------- embedding
    def _embed(self, task: int, embedding_of: int | None = None) -> list[Chunk]:
        """H^1 of a task's examples in chunks; `embedding_of`: use that fine-tune's embeddings."""
        data = self.data[task]
        embed = self.model.get_input_embeddings()
        weights = None
        if embedding_of is not None:
            prefix = self._embed_prefix()
            weights = {n: self.read(embedding_of, prefix + n) for n, _ in embed.named_parameters()}
        chunks = []
        for start in range(0, data.num_examples, self.batch_size):
            ids = data.input_ids[start : start + self.batch_size].to(self.device)
            mask = data.attention_mask[start : start + self.batch_size].to(self.device)
            with torch.no_grad():
                hidden, kwargs = layer_inputs(self.model, self.layers[0], ids, mask)
                if weights is not None:
                    hidden = _call(embed, weights, ids)
            chunks.append(Chunk(hidden, mask.bool(), ids, kwargs))
        return chunks

    def _embed_prefix(self) -> str:
        embed = self.model.get_input_embeddings()
        return next(name for name, module in self.model.named_modules() if module is embed) + "."

    # -------------------------------------------------------------------------------- SLTA
    def submodules(self, index: int, granularity: FeatureGranularity) -> tuple[Submodule, ...]:
        at = f"{self.prefix}.{index}."
        if granularity == "layer":
            return (Submodule(f"layers.{index}", index, (at,)),)
        return (
            Submodule(f"layers.{index}.self_attn", index, (at + "input_layernorm.", at + "self_attn.")),
            Submodule(f"layers.{index}.mlp", index, (at + "post_attention_layernorm.", at + "mlp.")),
        )

    def submodule_deltas(self, granularity: FeatureGranularity) -> Iterator[DeltaBatch]:
        if self.base is None:
            raise MethodError("slta needs a base model (base_model: in the merge config)")
        try:
            streams = [self._embed(t) for t in range(len(self.data))]
            for index, layer in enumerate(self.layers):
                thetas = [self.layer_params(k, index) for k in range(len(self.models))]
                subs = self.submodules(index, granularity)
                for task, chunks in enumerate(streams):
                    for chunk in chunks:
                        with torch.no_grad():
                            yield from self._chunk_deltas(layer, thetas, chunk, task, subs)
                    for model in ("base", *self._tasks):
                        self._count(model, task, self.data[task].num_examples)
                self.advance()
        finally:
            self._release()

    def _chunk_deltas(self, layer, thetas, chunk: Chunk, task: int, subs) -> Iterator[DeltaBatch]:
        """D_k of each submodule on this chunk; leaves the base layer output in `chunk.hidden`."""
        h, kw, valid = chunk.hidden, chunk.kwargs, chunk.valid
        if len(subs) == 1:
            out = _call(layer, None, h, **kw)
            deltas = torch.stack([_call(layer, theta, h, **kw) - out for theta in thetas])
            yield DeltaBatch(subs[0], task, deltas[:, valid])
        else:
            attn = attention_block(layer, None, h, kw)
            deltas = torch.stack([attention_block(layer, theta, h, kw) - attn for theta in thetas])
            yield DeltaBatch(subs[0], task, deltas[:, valid])
            middle = h + attn
            mlp = mlp_block(layer, None, middle)
            deltas = torch.stack([mlp_block(layer, theta, middle) - mlp for theta in thetas])
            yield DeltaBatch(subs[1], task, deltas[:, valid])
            out = middle + mlp
        chunk.hidden = out

    # ----------------------------------------------------------------------------- RegMean
    def input_grams(self) -> Iterator[LayerGrams]:
        """Each fine-tune k runs its own layers on task k's data; Grams of every Linear's input."""
        try:
            streams = [self._embed(k, embedding_of=k) for k in range(len(self.models))]
            for index, layer in enumerate(self.layers):
                grams: dict[str, list[torch.Tensor]] = {}
                for k, chunks in enumerate(streams):
                    theta = self.layer_params(k, index)
                    for rel, gram in self._layer_grams(layer, theta, chunks).items():
                        grams.setdefault(f"{self.prefix}.{index}.{rel}.weight", []).append(gram)
                    self._count(self._tasks[k], k, self.data[k].num_examples)
                yield LayerGrams(index, grams)
                self.advance()
        finally:
            self._release()

    def _layer_grams(self, layer, theta, chunks: list[Chunk]) -> dict[str, torch.Tensor]:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=self.device)
                for n, m in linears.items()}
        state: dict[str, Any] = {"valid": None, "last": (None, None)}

        def hook_for(name):
            def hook(module, args):
                x = args[0]
                if state["last"][0] is not x:  # q/k/v (gate/up) share one input: one Gram
                    rows = x[state["valid"]].to(torch.float32)  # (n_tokens, d_in)
                    state["last"] = (x, (rows.T @ rows).to(torch.float64))
                sums[name] += state["last"][1]
            return hook

        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
        try:
            with torch.no_grad():
                for chunk in chunks:
                    state["valid"], state["last"] = chunk.valid, (None, None)
                    chunk.hidden = _call(layer, theta, chunk.hidden, **chunk.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return sums

    # ------------------------------------------------------------------------------ Fisher
    def squared_gradients(self, model: int) -> dict[str, torch.Tensor]:
        """mean over examples of (d log p(example) / d theta)^2 for fine-tune `model` on its task.

        Memory: the fine-tune's network, the Fisher sums and one parameter's gradient at a time
        (each is squared into its sum as backward produces it, then dropped).
        """
        from merge_harness.io.models import build_model

        network = build_model(self.models[model].config, {n: self.read(model, n) for n in self._names})
        network = network.to(self.device)
        self.num_layers = len(decoder_layers(network)[1])  # the architecture check, as for SLTA
        fisher: dict[str, torch.Tensor] = {}
        for name, param in network.named_parameters():
            param.requires_grad_(name in self._names)
            if name in self._names:
                fisher[name] = torch.zeros_like(param)
                param.register_post_accumulate_grad_hook(_square_into(fisher[name]))
        data = self.data[model]
        for row in range(data.num_examples):
            ids = data.input_ids[row, : int(data.attention_mask[row].sum())].to(self.device)
            logits = network(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
            log_likelihood = torch.log_softmax(logits, -1).gather(1, ids[1:, None]).sum()
            log_likelihood.backward()
        del network
        return_free_memory()  # the network's pages, before the next fine-tune's
        self._count(self._tasks[model], model, data.num_examples * self.num_layers)
        for _ in range(self.num_layers // len(self.models)):
            self.advance()
        return {name: f.div_(data.num_examples) for name, f in fisher.items()}


def _square_into(total: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook: add the parameter's gradient squared to `total`, drop the grad."""

    def hook(param: torch.Tensor) -> None:
        total.add_(param.grad.detach() ** 2)
        param.grad = None

    return hook
