"""The contract of model-level merge methods (SLTA, RegMean, Fisher): what `merge_model` receives.

A per-tensor method sees one tensor at a time. A model-level method needs statistics of the
models *on calibration data*, which only running the models can give. The engine
(`merge_harness.merge.data_driven`) runs the models and hands the method a `CalibrationInputs` object; the
method pulls the statistics it needs and returns a `ModelMerge`:

    merge_model(inputs: CalibrationInputs, params) -> ModelMerge

Statistics are streamed layer by layer (generators), so a method never holds more than one
layer's worth of them. Everything in here is shapes and math; the engine owns files, devices,
batching and progress.

Indices: fine-tune k (= task k, 0-based, config order); `None` is the base model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from pydantic import Field

from merge_harness.core.results import Coefficient
from merge_harness.merges.base import Params

FeatureGranularity = Literal["layer", "attn_mlp"]


class CalibratedParams(Params):
    """Parameters every calibrated method has: how many examples per task, drawn with which seed."""

    num_samples: int = Field(30, ge=1, description="N, calibration examples per task")
    seed: int = Field(0, description="seed for drawing the calibration examples")


@dataclass(frozen=True)
class Submodule:
    """A unit that gets its own merge coefficients, and the tensors that belong to it.

    `name` is short and stable ("layers.3", "layers.3.self_attn", "layers.3.mlp"); `prefixes`
    are the checkpoint tensor-name prefixes of its parameters ("model.layers.3.self_attn.", ...).
    """

    name: str
    layer: int
    prefixes: tuple[str, ...]

    def owns(self, tensor_name: str) -> bool:
        return tensor_name.startswith(self.prefixes)


@dataclass(frozen=True)
class DeltaBatch:
    """Features of one submodule on a slice of one task's calibration tokens.

    deltas[k] = f(x; theta_k) - f(x; theta_0) for every fine-tune k, at the non-padding token
    positions x of the slice: shape (T, n_tokens, d_out), float32.
    """

    submodule: Submodule
    task: int
    deltas: torch.Tensor


@dataclass(frozen=True)
class LayerGrams:
    """RegMean statistics of one decoder layer.

    grams[name][k] = X_k^T X_k (d_in, d_in): the Gram matrix of the inputs of linear weight
    `name`, with X_k the inputs model k's own layer sees on task k's calibration tokens.
    """

    layer: int
    grams: dict[str, list[torch.Tensor]]


class CalibrationInputs(Protocol):
    """What the engine offers a model-level method (implemented in `merge_harness.merge.features`)."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """One label per fine-tune, config order."""
        ...

    def tensor_names(self) -> list[str]:
        """The floating-point tensors to merge, checkpoint order."""
        ...

    def read(self, model: int | None, name: str) -> torch.Tensor:
        """One tensor of fine-tune `model` (or the base, `None`) in float32."""
        ...

    def submodule_deltas(self, granularity: FeatureGranularity) -> Iterator[DeltaBatch]:
        """SLTA features: inputs propagate through the pre-trained layers only."""
        ...

    def input_grams(self) -> Iterator[LayerGrams]:
        """RegMean statistics, layer by layer; each model propagates through its own layers."""
        ...

    def squared_gradients(self, model: int) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of fine-tune `model` on its own task's calibration data."""
        ...


@dataclass
class ModelMerge:
    """What a model-level method returns: float32 tensors by name, and any solved coefficients."""

    state: dict[str, torch.Tensor]
    coefficients: list[Coefficient] = field(default_factory=list)


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The plain element-wise mean of the fine-tunes (what data-driven methods fall back to)."""
    return torch.stack(list(tensors)).mean(dim=0)
