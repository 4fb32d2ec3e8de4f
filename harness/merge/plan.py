"""The cheap half of a merge: read headers, check the models agree, resolve every parameter.

`build_plan` opens each checkpoint's safetensors headers (no tensor data), checks architectures,
tensor names and shapes and validates the method's parameters for every tensor, so that every
error a config can cause is raised before any tensor is read. (The output directory is checked
by the engine, `merge_to_disk`, before it starts.) With a tokenizer source it also builds the
output vocabulary (`merge_harness.merge.vocabulary`) and gives each input of an embedding-like
tensor its row layout in it, which the engine applies as it reads the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_harness.core.errors import CheckpointError, ConfigError
from merge_harness.io.checkpoint import Checkpoint, TensorInfo
from merge_harness.io.models import resolve_model
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.methods import get_method
from merge_harness.merge.output_files import resolve_chat_template
from merge_harness.merge.parameters import LAYER_INDEX, ParamResolver, gradient_position
from merge_harness.merge.vocabulary import (
    Member,
    OutputVocabulary,
    RowMap,
    is_vocabulary_tensor,
    lay_out,
    plan_vocabulary,
    read_vocabulary_tensor,
    with_vocab_size,
)
from merge_harness.merges.base import MergeMethod, Params

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class TensorSource:
    """One input of an output tensor: a checkpoint and the tensor's name in it (with slices, an
    output layer reads another layer index of each source). `vocabulary`: for an embedding-like
    tensor of a merge with a tokenizer source, its rows laid out in the output vocabulary."""

    checkpoint: Checkpoint
    name: str
    vocabulary: RowMap | None = None

    @property
    def file(self) -> Path:
        return self.checkpoint.tensors[self.name].file

    def read(self, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or `rows` of it) as the merge method sees it; a vocabulary-mapped one whole."""
        if self.vocabulary is None:
            return self.checkpoint.read(self.name, rows)
        return read_vocabulary_tensor(self.checkpoint, self.name, self.vocabulary, rows)


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its layout, its inputs and the parameters resolved for its name."""

    info: TensorInfo  # output name, shape, dtype
    params: Params | None  # None: passed through from the base (non-float tensors)
    model_params: tuple[Params, ...]
    base: TensorSource | None  # theta_0, for methods that use a base
    sources: tuple[TensorSource, ...]  # the other inputs, in the order of `model_params`


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    base: Checkpoint | None
    models: list[Checkpoint]  # the other inputs (with `models:`, passed as `tensors` in config order)
    tasks: list[TensorTask]
    out_config: dict[str, Any]
    sidecar_source: Path  # where the output's tokenizer (and generation config) files come from
    notes: list[str] = field(default_factory=list)  # config keys accepted but without effect, and the like
    vocabulary: OutputVocabulary | None = None  # with a tokenizer source
    readers: list[Checkpoint] = field(default_factory=list)  # inputs read only for vocabulary rows

    @property
    def output_bytes(self) -> int:
        return sum(task.info.nbytes for task in self.tasks)

    @property
    def remaps_vocabulary(self) -> bool:
        """Whether embedding rows are laid out in a new vocabulary (its tokenizer must go along)."""
        return any(s is not None and s.vocabulary is not None
                   for task in self.tasks for s in (*task.sources, task.base))

    def inputs(self) -> dict[str, Path]:
        """Every directory the merge reads, by what the config calls it (an output must be none)."""
        found = {f"base_model {self.base.path}": self.base.path} if self.base is not None else {}
        found.update({f"{model.path}": model.path for model in (*self.models, *self.readers)})
        found.setdefault(f"tokenizer_source {self.sidecar_source}", self.sidecar_source)
        return found

    def close(self) -> None:
        for checkpoint in (*self.models, *([self.base] if self.base else []), *self.readers):
            checkpoint.close()


def build_plan(config: MergeConfig, allow_crimes: bool = False) -> MergePlan:
    """`allow_crimes`: models of different architectures may merge where names and shapes match."""
    method = get_method(config.method)
    opened: dict[str, Checkpoint] = {}

    def open_model(ref: str) -> Checkpoint:
        if ref not in opened:
            opened[ref] = Checkpoint.open(resolve_model(ref))
        return opened[ref]

    if config.slices:
        return _build_sliced_plan(config, method, open_model)
    base, entries = _split_inputs(config, method)
    models = [open_model(entry.model) for entry in entries]
    base = open_model(base) if base is not None else None
    reference = base or models[0]
    vocab = _plan_vocabulary(config, open_model)
    check_compatible(reference, models, allow_crimes, vocab is not None)
    out_dtype = _output_dtype(config, reference)
    num_layers = int(reference.config.get("num_hidden_layers", 0) or 0)
    resolver = ParamResolver(config, method)
    chains = [[entry.parameters, config.parameters] for entry in entries]
    # the inputs mergekit lays out in the vocabulary: the models, and the base when it is not one
    base_ref = [config.base_model] if config.base_model else []
    members = list(dict.fromkeys([e.model for e in config.models] + base_ref))
    notes = _ignored_keys(config, method)
    tasks = []
    for name, info in reference.tensors.items():
        sources = tuple(TensorSource(model, name) for model in models)
        base_source = TensorSource(base, name) if base is not None else None
        if not info.dtype.is_floating_point:
            tasks.append(TensorTask(info, None, (), base_source, sources))
            continue
        position = gradient_position(name, num_layers)
        params, model_params = resolver.resolve(name, position, [config.parameters],
                                                [(name, chain) for chain in chains])
        out = TensorInfo(name, info.shape, out_dtype, info.file)
        task = TensorTask(out, params, model_params, base_source, sources)
        if vocab is not None and is_vocabulary_tensor(name):
            inputs = [Member(ref, open_model(ref), name) for ref in members]
            task = lay_out(vocab, task, inputs, config.base_model, notes)
        tasks.append(task)
    out_config = _output_config(reference, out_dtype, vocab=vocab)
    opened = [open_model(r) for r in members] if vocab is not None else []
    readers = [c for c in dict.fromkeys(opened) if c not in (*models, base)]
    return _finish(MergePlan(config, method, base, models, tasks, out_config, _sidecars(vocab, reference),
                             notes, vocab, readers))


def _output_config(reference: Checkpoint, out_dtype: torch.dtype, num_layers: int | None = None,
                   vocab: OutputVocabulary | None = None) -> dict:
    out_config = dict(reference.config)
    out_config.pop("quantization_config", None)
    out_config["torch_dtype"] = out_config["dtype"] = str(out_dtype).removeprefix("torch.")
    if num_layers is not None:
        out_config["num_hidden_layers"] = num_layers
    return with_vocab_size(out_config, vocab.size) if vocab is not None else out_config


def _sidecars(vocab: OutputVocabulary | None, reference: Checkpoint) -> Path:
    """Where the tokenizer (and other non-weight files) come from: the output vocabulary's
    directory with a tokenizer source (a model's, or the merged one's), else the reference model's."""
    return vocab.tokenizer_dir if vocab is not None else reference.path


def _plan_vocabulary(config: MergeConfig, open_model) -> OutputVocabulary | None:
    if config.tokenizer_choice is None:
        return None
    return plan_vocabulary(config, {ref: open_model(ref) for ref in config.referenced_models()})


def _finish(plan: MergePlan) -> MergePlan:
    """Checks that need the whole plan: a model-level method cannot take a new vocabulary (it
    reads whole models), and the chat template must resolve (before any tensor is read)."""
    if plan.vocabulary is not None:
        plan.notes[:0] = [n for n in plan.vocabulary.notes if n not in plan.notes]
    plan.notes[:] = list(dict.fromkeys(plan.notes))
    mapped = plan.remaps_vocabulary
    if mapped and not plan.method.streaming:
        where = "tokenizer" if plan.config.tokenizer is not None else "tokenizer_source"
        raise ConfigError(f"{where}: the inputs' vocabularies differ from the output's, and method "
                          f"{plan.method.name!r} merges whole models with calibration data: give every "
                          "input the same tokenizer, or use a per-tensor method")
    if plan.config.chat_template != "auto":  # auto reads the output's inputs; it is resolved when written
        resolve_chat_template(plan.config)
    return plan


def _ignored_keys(config: MergeConfig, method: MergeMethod) -> list[str]:
    """mergekit keys that parse but change nothing here: said, never silently dropped."""
    notes = []
    if any(piece.residual_weight is not None for piece in config.slices or ()):
        notes.append("slices[].residual_weight: ignored (mergekit ignores it too)")
    if "int8_mask" in config.parameters and "int8_mask" in method.params.model_fields:
        notes.append("parameters.int8_mask: no effect (masks are boolean tensors; merging is in float32)")
    return notes


def _build_sliced_plan(config: MergeConfig, method: MergeMethod, open_model) -> MergePlan:
    """mergekit's `slices:`: output layers are laid end to end, slice after slice; an output
    layer at offset i of a slice merges layer `start + i` of each of the slice's sources.

    Non-layer tensors: those named like an embedding come from the first slice's sources,
    the rest (final norm, lm_head) from the last slice's, as mergekit's pre/post weights.
    Gradient parameters run over each slice's own layers (0 at its first, 1 at its last).
    """
    if not method.streaming:
        raise ConfigError(f"slices: method {method.name!r} merges whole models with calibration data; "
                          "list them under `models:`")
    groups = [_slice_inputs(config, method, index) for index in range(len(config.slices))]
    reference = open_model(config.base_model or config.slices[0].sources[0].model)
    out_dtype = _output_dtype(config, reference)
    resolver = ParamResolver(config, method)
    vocab = _plan_vocabulary(config, open_model)
    notes = _ignored_keys(config, method)
    tasks: list[TensorTask] = []
    first, last = groups[0], groups[-1]
    non_layer = [name for name in reference.tensors if LAYER_INDEX.search(name) is None]
    pre = [name for name in non_layer if "embed" in name]
    post = [name for name in non_layer if "embed" not in name]
    for name in pre:
        tasks.append(_slice_task(config, resolver, first, open_model, name, name, 0.0, out_dtype))
    output_layer = 0
    for group in groups:
        count = group.piece.num_layers
        for offset in range(count):
            position = offset / (count - 1) if count > 1 else 1.0
            for in_name, out_name in _layer_names(group, open_model, offset, output_layer):
                tasks.append(_slice_task(config, resolver, group, open_model, in_name, out_name, position,
                                         out_dtype, offset))
            output_layer += 1
    for name in post:
        tasks.append(_slice_task(config, resolver, last, open_model, name, name, 0.0, out_dtype))
    if vocab is not None:
        tasks = [_slice_vocabulary(vocab, task, first if task.info.name in pre else last, open_model, config,
                                   notes) for task in tasks]
    base = open_model(config.base_model) if config.base_model else None
    others = [c for ref, c in _opened_models(groups, open_model) if base is None or c is not base]
    out_config = _output_config(reference, out_dtype, output_layer, vocab)
    return _finish(MergePlan(config, method, base, others, tasks, out_config, _sidecars(vocab, reference),
                             notes, vocab))


def _slice_vocabulary(vocab: OutputVocabulary, task: TensorTask, group: SliceInputs, open_model,
                      config: MergeConfig, notes: list[str]) -> TensorTask:
    """A non-layer vocabulary tensor of a sliced merge, laid out over its slice's sources."""
    if task.params is None or LAYER_INDEX.search(task.info.name) or not is_vocabulary_tensor(task.info.name):
        return task
    refs = dict.fromkeys(s.model for s in group.piece.sources)
    members = [Member(ref, open_model(ref), task.info.name) for ref in refs]
    return lay_out(vocab, task, members, group.piece.base_model or config.base_model, notes)


@dataclass(frozen=True)
class SliceInputs:
    """One output slice, split as the method uses a base: `base` (or None) and the others."""

    index: int
    piece: Any  # the config's OutputSlice
    base: Any  # its SliceSource used as theta_0, or None
    entries: list  # the other SliceSources, in config order


def _slice_inputs(config: MergeConfig, method: MergeMethod, index: int) -> SliceInputs:
    piece = config.slices[index]
    where = f"slices[{index}]"
    base_ref = piece.base_model or config.base_model
    sources = list(piece.sources)
    base = None
    if method.base_role != "unused" and base_ref is not None:
        base = next((s for s in sources if s.model == base_ref), None)
        if base is None and method.base_role == "required":
            raise ConfigError(f"{where}.sources: the base model {base_ref} is not one of the slice's sources "
                              f"(method {method.name!r} merges each slice's layers against the base's)")
        sources = [s for s in sources if s is not base]
    elif method.base_role == "required":
        raise ConfigError(f"base_model: method {method.name!r} needs a base model")
    _check_count(method, len(sources), f"{where}.sources")
    return SliceInputs(index, piece, base, sources)


def _opened_models(groups: list[SliceInputs], open_model) -> list[tuple[str, Checkpoint]]:
    refs = dict.fromkeys(s.model for g in groups for s in ([g.base] if g.base else []) + g.entries)
    return [(ref, open_model(ref)) for ref in refs]


def _layer_names(group: SliceInputs, open_model, offset: int, output_layer: int) -> list[tuple[str, str]]:
    """(input name in the slice's first source, output name) of every tensor of one layer."""
    first = (group.base or group.entries[0])
    index = first.layer_range[0] + offset
    checkpoint = open_model(first.model)
    pattern = re.compile(rf"(^|\.)layers\.{index}\.")
    names = [(n, pattern.sub(rf"\g<1>layers.{output_layer}.", n, count=1))
             for n in checkpoint.tensors if pattern.search(n)]
    if not names:
        layers = int(checkpoint.config.get("num_hidden_layers", 0) or 0)
        raise ConfigError(f"slices[{group.index}].sources: {first.model} has no layer {index} "
                          f"(it has {layers}; layer_range is [start, end) from 0)")
    return names


def _source_name(source, in_name: str, first_start: int, offset: int | None) -> str:
    """The tensor of `source` that feeds `in_name` of the slice's first source."""
    if offset is None:
        return in_name
    first_index = first_start + offset
    return re.sub(rf"(^|\.)layers\.{first_index}\.", rf"\g<1>layers.{source.layer_range[0] + offset}.",
                  in_name, count=1)


def _slice_task(config, resolver, group: SliceInputs, open_model, in_name: str, out_name: str,
                position: float, out_dtype: torch.dtype, offset: int | None = None) -> TensorTask:
    first = group.base or group.entries[0]
    start = first.layer_range[0]

    def source_of(entry) -> TensorSource:
        checkpoint = open_model(entry.model)
        name = _source_name(entry, in_name, start, offset)
        if name not in checkpoint.tensors:
            raise CheckpointError(f"{checkpoint.path}: tensor {name!r} is missing "
                                  f"(needed for {out_name!r} by slices[{group.index}])")
        return TensorSource(checkpoint, name)

    base = source_of(group.base) if group.base is not None else None
    sources = tuple(source_of(entry) for entry in group.entries)
    info = (base or sources[0]).checkpoint.tensors[(base or sources[0]).name]
    mapped = config.tokenizer_choice is not None and offset is None and is_vocabulary_tensor(in_name)
    rows_may_differ = int(mapped)  # embedding rows are laid out in the output vocabulary later
    for source in (*([base] if base else []), *sources):
        shape = source.checkpoint.tensors[source.name].shape
        if shape[rows_may_differ:] != info.shape[rows_may_differ:]:
            raise CheckpointError(f"{source.file}: tensor {source.name!r} has shape {list(shape)}, "
                                  f"but {info.file} has {list(info.shape)} (slices[{group.index}])")
    if not info.dtype.is_floating_point:
        return TensorTask(TensorInfo(out_name, info.shape, info.dtype, info.file), None, (), base, sources)
    chains = [(source.name, [entry.parameters, group.piece.parameters, config.parameters])
              for entry, source in zip(group.entries, sources)]
    params, model_params = resolver.resolve(out_name, position, [group.piece.parameters, config.parameters],
                                            chains)
    out = TensorInfo(out_name, info.shape, out_dtype, info.file)
    return TensorTask(out, params, model_params, base, sources)


# Tensor names that exercise the usual parameter filters (attention, MLP, norms, embeddings).
PROBE_TENSORS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
)


def validate_config(config: MergeConfig) -> MergeMethod:
    """Check the method, the model count and every parameter without opening a checkpoint.

    Used by `run --dry-run` so that configs for models that are not on this machine (HF ids of
    7B models, say) can still be validated.
    """
    method = get_method(config.method)
    resolver = ParamResolver(config, method)
    if config.slices:
        groups = [_slice_inputs(config, method, index) for index in range(len(config.slices))]
        shared_chains = [[g.piece.parameters, config.parameters] for g in groups]
        model_chains = [[[e.parameters, g.piece.parameters, config.parameters] for e in g.entries]
                        for g in groups]
    else:
        _, entries = _split_inputs(config, method)
        shared_chains = [[config.parameters]]
        model_chains = [[[entry.parameters, config.parameters] for entry in entries]]
    for shared, chains in zip(shared_chains, model_chains):
        for name in PROBE_TENSORS:
            for position in (0.0, 1.0):
                resolver.resolve(name, position, shared, [(name, chain) for chain in chains])
    return method


def _split_inputs(config: MergeConfig, method: MergeMethod):
    """Separate the base from the other inputs, following the method's use of a base."""
    entries = list(config.models)
    base = config.base_model
    if method.base_role == "unused":
        base = None
    else:
        if base is None and method.base_role == "required":
            raise ConfigError(f"base_model: method {method.name!r} needs a base model")
        entries = [e for e in entries if e.model != base]
    _check_count(method, len(entries), "models")
    return base, entries


def _check_count(method: MergeMethod, count: int, where: str) -> None:
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        wanted = f"{method.min_models}" + (
            ""
            if method.max_models == method.min_models
            else f" to {method.max_models}"
            if method.max_models
            else " or more"
        )
        raise ConfigError(f"{where}: method {method.name!r} takes {wanted} non-base models, got {count}")


def check_compatible(reference: Checkpoint, models: list[Checkpoint], allow_crimes: bool = False,
                     vocabularies: bool = False) -> None:
    """Same architecture (unless `allow_crimes`), same tensor names, same shapes: else name the
    file and tensor at fault. `vocabularies`: the inputs are laid out in one output vocabulary,
    so embedding-like tensors may differ in their number of rows."""
    for model in models:
        if model.architecture != reference.architecture and not allow_crimes:
            raise CheckpointError(
                f"{model.path}: architecture {model.architecture} differs from "
                f"{reference.architecture} of {reference.path} (--allow-crimes merges them anyway)"
            )
        missing = sorted(set(reference.tensors) - set(model.tensors))
        extra = sorted(set(model.tensors) - set(reference.tensors))
        if missing or extra:
            name, what = (missing[0], "is missing") if missing else (extra[0], "is unexpected")
            count = len(missing) + len(extra)
            raise CheckpointError(
                f"{model.path}: tensor {name!r} {what} (compared with {reference.path}; "
                f"{count} name(s) differ)"
            )
        for name, info in reference.tensors.items():
            other = model.tensors[name]
            skip = int(vocabularies and is_vocabulary_tensor(name))
            if other.shape[skip:] != info.shape[skip:]:
                hint = " (different vocabularies: set tokenizer_source: union)" if (
                    is_vocabulary_tensor(name) and other.shape[1:] == info.shape[1:]) else ""
                raise CheckpointError(
                    f"{other.file}: tensor {name!r} has shape {list(other.shape)}, "
                    f"but {info.file} has {list(info.shape)}{hint}"
                )


def _output_dtype(config: MergeConfig, reference: Checkpoint) -> torch.dtype:
    if config.output_dtype:
        return DTYPES[config.output_dtype]
    floats = [i.dtype for i in reference.tensors.values() if i.dtype.is_floating_point]
    return floats[0] if floats else torch.float32
