"""Per-tensor parameter values: mergekit's filters, gradients and precedence, validated.

A setting in a merge config is a value, a list (a gradient over the layers) or filter
conditions; `evaluate_setting` gives its value for one tensor, and `ParamResolver` resolves a
method's parameters for a tensor along mergekit's chain (a model's own settings, then its
slice's, then the merge's) and validates them against the method's parameter models.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from merge_harness.core.errors import ConfigError
from merge_harness.merge.config import Condition, MergeConfig, Setting
from merge_harness.merges.base import MergeMethod, Params

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def gradient_position(name: str, num_layers: int) -> float:
    """Where a tensor sits for gradient-valued parameters: layer i of L -> i/(L-1), others 0."""
    match = LAYER_INDEX.search(name)
    if match is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return int(match.group(1)) / (num_layers - 1)


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
    """Resolves and validates the method's parameter models for each tensor, with mergekit's
    precedence: each parameter takes its value from the first settings in a chain (a model's
    own, then its slice's, then the merge's) that give one for this tensor, so a filter that
    does not match falls through to the next level. Per-model parameters may be given at the
    slice or merge level once for all models; method parameters only there.
    """

    def __init__(self, config: MergeConfig, method: MergeMethod):
        self.method = method
        self.model_fields = set(method.model_params.model_fields) | set(_aliases(method.model_params))
        self.defaults: dict[str, Any] = {}
        if config.mergekit_compat and "rescale_norm" in method.params.model_fields:
            self.defaults["rescale_norm"] = "l1"
        self._validate = lru_cache(maxsize=4096)(self._validate_uncached)

    def resolve(
        self,
        name: str,
        position: float,
        shared: list[dict[str, Setting]],
        per_model: list[tuple[str, list[dict[str, Setting]]]],
    ) -> tuple[Params, tuple[Params, ...]]:
        """`shared`: the chain for method parameters; `per_model`: (input tensor name, chain) per
        model, whose first element is the model's own settings (every key of it applies)."""
        values = {**self.defaults, **self._first_values(shared, name, position, own=False)}
        params = self._validate(self.method.params, tuple(sorted(values.items())), None, name)
        model_params = []
        for index, (input_name, chain) in enumerate(per_model):
            own = self._first_values(chain, input_name, position, own=True)
            values = tuple(sorted(own.items()))
            model_params.append(self._validate(self.method.model_params, values, index, name))
        return params, tuple(model_params)

    def _first_values(self, chain: list[dict[str, Setting]], name: str, position: float, own: bool) -> dict:
        found: dict[str, Any] = {}
        for level, settings in enumerate(chain):
            for key, setting in settings.items():
                is_model_key = key in self.model_fields
                applies = (own and (level == 0 or is_model_key)) or (not own and not is_model_key)
                if applies and key not in found:
                    value = evaluate_setting(setting, name, position)
                    if value is not None:
                        found[key] = value
        return found

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
