"""The cheap half of a merge: read headers, check the models agree, resolve every parameter.

`build_plan` opens each checkpoint's safetensors headers (no tensor data), checks architectures,
tensor names and shapes and validates the method's parameters for every tensor, so that every
error a config can cause is raised before any tensor is read. (The output directory is checked
by the engine, `merge_to_disk`, before it starts.)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from merge_harness.core.errors import CheckpointError, ConfigError
from merge_harness.io.checkpoint import Checkpoint, TensorInfo
from merge_harness.io.models import resolve_model
from merge_harness.merge.config import Condition, MergeConfig, Setting
from merge_harness.merge.methods import get_method
from merge_harness.merges.base import MergeMethod, Params

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its layout and the parameters resolved for its name."""

    info: TensorInfo  # output name, shape, dtype
    params: Params | None  # None: passed through from the base (non-float tensors)
    model_params: tuple[Params, ...]


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    base: Checkpoint | None
    models: list[Checkpoint]  # the inputs passed as `tensors` to the method, in config order
    tasks: list[TensorTask]
    out_config: dict[str, Any]
    sidecar_source: Path

    @property
    def output_bytes(self) -> int:
        return sum(task.info.nbytes for task in self.tasks)

    def inputs(self) -> dict[str, Path]:
        """Every directory the merge reads, by what the config calls it (an output must be none)."""
        found = {f"base_model {self.base.path}": self.base.path} if self.base is not None else {}
        found.update({f"{model.path}": model.path for model in self.models})
        found.setdefault(f"tokenizer_source {self.sidecar_source}", self.sidecar_source)
        return found

    def close(self) -> None:
        for checkpoint in (*self.models, *([self.base] if self.base else [])):
            checkpoint.close()


def build_plan(config: MergeConfig) -> MergePlan:
    method = get_method(config.method)
    base, entries = _split_inputs(config, method)
    models = [Checkpoint.open(resolve_model(entry.model)) for entry in entries]
    if base is not None:
        base = Checkpoint.open(resolve_model(base))
    reference = base or models[0]
    check_compatible(reference, models)
    out_dtype = _output_dtype(config, reference)
    num_layers = int(reference.config.get("num_hidden_layers", 0) or 0)
    resolver = ParamResolver(config, method, [entry.parameters for entry in entries])
    tasks = []
    for name, info in reference.tensors.items():
        if not info.dtype.is_floating_point:
            tasks.append(TensorTask(info, None, ()))
            continue
        params, model_params = resolver.resolve(name, gradient_position(name, num_layers))
        tasks.append(TensorTask(TensorInfo(name, info.shape, out_dtype, info.file), params, model_params))
    out_config = dict(reference.config)
    out_config.pop("quantization_config", None)
    out_config["torch_dtype"] = out_config["dtype"] = str(out_dtype).removeprefix("torch.")
    sidecars = Path(resolve_model(config.tokenizer_source)) if config.tokenizer_source else reference.path
    return MergePlan(config, method, base, models, tasks, out_config, sidecars)


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
    _, entries = _split_inputs(config, method)
    resolver = ParamResolver(config, method, [entry.parameters for entry in entries])
    for name in PROBE_TENSORS:
        for position in (0.0, 1.0):
            resolver.resolve(name, position)
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
    count = len(entries)
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        wanted = f"{method.min_models}" + (
            ""
            if method.max_models == method.min_models
            else f" to {method.max_models}"
            if method.max_models
            else " or more"
        )
        raise ConfigError(f"models: method {method.name!r} takes {wanted} non-base models, got {count}")
    return base, entries


def check_compatible(reference: Checkpoint, models: list[Checkpoint]) -> None:
    """Same architecture, same tensor names, same shapes: else name the file and tensor at fault."""
    for model in models:
        if model.architecture != reference.architecture:
            raise CheckpointError(
                f"{model.path}: architecture {model.architecture} differs from "
                f"{reference.architecture} of {reference.path}"
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
            if other.shape != info.shape:
                raise CheckpointError(
                    f"{other.file}: tensor {name!r} has shape {list(other.shape)}, "
                    f"but {info.file} has {list(info.shape)}"
                )


def _output_dtype(config: MergeConfig, reference: Checkpoint) -> torch.dtype:
    if config.output_dtype:
        return DTYPES[config.output_dtype]
    floats = [i.dtype for i in reference.tensors.values() if i.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def gradient_position(name: str, num_layers: int) -> float:
    """Where a tensor sits for gradient-valued parameters: layer i of L -> i/(L-1), others 0."""
    match = LAYER_INDEX.search(name)
    if match is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return int(match.group(1)) / (num_layers - 1)


# -------------------------------------------------------------------------- parameter resolution


def evaluate_setting(setting: Setting, name: str, position: float) -> Any:
    """A setting's value for one tensor: filters pick a branch, gradients interpolate."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], Condition):
        for condition in setting:
            if condition.filter in (None, "*") or condition.filter in name:
                return evaluate_setting(condition.value, name, position)
        return None
    if isinstance(setting, list):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(position * (len(setting) - 1))]
        scaled = position * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        return (1 - (scaled - low)) * setting[low] + (scaled - low) * setting[high]
    return setting


class ParamResolver:
    """Resolves and validates the method's parameter models for each tensor name."""

    def __init__(self, config: MergeConfig, method: MergeMethod, per_model: list[dict[str, Setting]]):
        self.method = method
        self.shared = dict(config.parameters)
        self.per_model = per_model
        model_fields = set(method.model_params.model_fields)
        for alias in _aliases(method.model_params):
            model_fields.add(alias)
        # mergekit lets a per-model parameter be given once for all models at the top level.
        self.shared_for_models = {k: v for k, v in self.shared.items() if k in model_fields}
        for key in self.shared_for_models:
            self.shared.pop(key)
        if config.mergekit_compat and "rescale_norm" in method.params.model_fields:
            self.shared.setdefault("rescale_norm", "l1")
        self._validate = lru_cache(maxsize=4096)(self._validate_uncached)

    def resolve(self, name: str, position: float) -> tuple[Params, tuple[Params, ...]]:
        shared = self._values(self.shared, name, position)
        params = self._validate(self.method.params, shared, None, name)
        model_params = []
        for index, settings in enumerate(self.per_model):
            merged = {**self.shared_for_models, **settings}
            values = self._values(merged, name, position)
            model_params.append(self._validate(self.method.model_params, values, index, name))
        return params, tuple(model_params)

    @staticmethod
    def _values(settings: dict[str, Setting], name: str, position: float) -> tuple:
        values = ((k, evaluate_setting(v, name, position)) for k, v in settings.items())
        return tuple(sorted((k, v) for k, v in values if v is not None))

    def _validate_uncached(self, model: type[Params], values: tuple, scope: int | None, name: str) -> Params:
        for key, value in values:
            if isinstance(value, float) and not math.isfinite(value):
                raise ParameterError(self.method.name, scope, key, f"must be a finite number, got {value}",
                                     name, dict(values))
        try:
            return model.model_validate(dict(values))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"]) or "(value)"
            raise ParameterError(self.method.name, scope, field, error["msg"], name, dict(values)) from None


class ParameterError(ConfigError):
    """A method parameter is invalid; says which field of which scope, so that an experiment can
    name its own YAML field instead of the merge config it generated (`merge_harness.run.experiment`)."""

    def __init__(self, method: str, scope: int | None, field: str, reason: str, tensor: str, given: dict):
        self.method, self.scope, self.field, self.reason, self.tensor = method, scope, field, reason, tensor
        where = "parameters" if scope is None else f"models[{scope}].parameters"
        super().__init__(
            f"{where}.{field}: {reason} (method {method}, tensor {tensor}; given {json.dumps(given)})"
        )


def _aliases(model: type[Params]) -> list[str]:
    return [f.alias for f in model.model_fields.values() if f.alias]
