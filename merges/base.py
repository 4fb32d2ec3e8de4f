"""The contract every merge method fulfils: a pure function on tensors plus typed parameters.

A method is data, not a class hierarchy: a frozen `MergeMethod` record naming its parameter models,
its paper, and either a per-tensor function (streamed by the engine, tensor by tensor) or a
model-level function (given calibration data, e.g. SLTA). Nothing in `merges/` reads files,
moves tensors between devices, or draws progress bars: the engine does that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base of every parameter model: frozen, and unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoParams(Params):
    """For methods without parameters at a given scope."""


class TensorMergeFn(Protocol):
    def __call__(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        model_params: Sequence[Any],
        params: Any,
        generator: torch.Generator,
    ) -> torch.Tensor: ...


BaseRole = Literal["required", "optional", "unused"]


@dataclass(frozen=True)
class MergeMethod:
    """One registered merge method.

    `params` holds method-wide values (lambda, normalize, t...), `model_params` the values given
    per input model (weight, density...). Either may vary by tensor name through filters in the
    config; the engine resolves and validates them per tensor before calling `merge_tensor`.
    `base_role`: "required" methods get the base and the *other* models as `tensors`; "optional"
    methods (nuslerp, karcher) the same when a base is given, else `base=None`; "unused" methods
    (linear, passthrough) get every listed model as `tensors` and `base=None`.
    `elementwise`: each output entry depends only on the same entry of the inputs (and no random
    draws), so the engine may merge a large tensor a block of rows at a time, with the same result.
    """

    name: str
    description: str
    paper: str
    equation: str
    params: type[Params] = NoParams
    model_params: type[Params] = NoParams
    base_role: BaseRole = "required"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    elementwise: bool = False
    merge_tensor: TensorMergeFn | None = None
    merge_model: Callable[..., Any] | None = None

    @property
    def streaming(self) -> bool:
        """True when the engine can merge tensor by tensor without calibration data."""
        return self.merge_tensor is not None

    def __post_init__(self) -> None:
        if (self.merge_tensor is None) == (self.merge_model is None):
            raise ValueError(f"method {self.name!r} needs exactly one of merge_tensor/merge_model")
