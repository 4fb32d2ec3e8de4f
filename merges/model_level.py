"""The contract of model-level merge methods (SLTA, RegMean, Fisher): what `merge_model` receives.

A per-tensor method sees one tensor at a time. A model-level method needs statistics of the
models *on calibration data*, which only running the models can give. The engine
(`merge_harness.merge.data_driven`) runs the models and hands the method a `CalibrationInputs` object; the
method pulls the statistics it needs and returns a `ModelMerge`:

    merge_model(inputs: CalibrationInputs, params) -> ModelMerge

Statistics are streamed layer by layer (generators), so a method never holds more than one
layer's worth of them. Everything in here is shapes and math; the engine owns files, devices,
batching and progress.

`ModelMerge.state` maps every name of `inputs.tensor_names()` to its merged float32 tensor. A
plain dict is fine. A method that can make its tensors one at a time once the statistics are in
returns a `LazyState` instead: the engine takes each tensor (`pop`) just before it writes it to
disk or into a model, so the whole merged model never exists besides its destination, and the
method's own buffers for that tensor are released as it goes. Errors raised while a lazy tensor
is made (ValueError, RuntimeError) are reported like errors of `merge_model` itself.

Indices: fine-tune k (= task k, 0-based, config order); `None` is the base model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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

    def fingerprint(self) -> str:
        """Identifies the models and the calibration tokens: equal fingerprints, equal statistics."""
        ...


_REUSE: ContextVar[dict | None] = ContextVar("statistics_reuse", default=None)


@contextmanager
def statistics_reuse() -> Iterator[None]:
    """Inside the block, a method's statistics computed once per (inputs, key) are reused
    (`reused`): e.g. a held-out search over SLTA's `scale` runs the calibration forward passes
    once, not once per grid value. Outside any block nothing is kept; a block inside another
    shares the outer one's statistics (a job's search and its final merge)."""
    if _REUSE.get() is not None:
        yield
        return
    token = _REUSE.set({})
    try:
        yield
    finally:
        _REUSE.reset(token)


def reused(inputs: CalibrationInputs, key: tuple, compute: Callable[[], object]) -> object:
    """`compute()`, or its earlier value for the same inputs and key inside `statistics_reuse`."""
    kept = _REUSE.get()
    if kept is None:
        return compute()
    full_key = (inputs.fingerprint(), *key)
    if full_key not in kept:
        kept[full_key] = compute()
    return kept[full_key]


@dataclass
class ModelMerge:
    """What a model-level method returns: float32 tensors by name (a dict or a `LazyState`),
    and any solved coefficients."""

    state: Mapping[str, torch.Tensor]
    coefficients: list[Coefficient] = field(default_factory=list)


class LazyState(Mapping[str, torch.Tensor]):
    """Merged tensors made on request: `state[name]` is `make(name)`; `pop(name)` also calls
    `release(name)`, which frees what only that tensor needed (e.g. its Fisher sums)."""

    def __init__(
        self,
        names: Sequence[str],
        make: Callable[[str], torch.Tensor],
        release: Callable[[str], None] = lambda name: None,
    ):
        self._names, self._make, self._release = list(names), make, release

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def pop(self, name: str) -> torch.Tensor:
        tensor = self[name]
        self._release(name)
        return tensor


class FineTuneTensors(Sequence[torch.Tensor]):
    """Tensor `name` of every fine-tune, read when indexed: iterating holds one at a time."""

    def __init__(self, inputs: CalibrationInputs, name: str):
        self._inputs, self._name = inputs, name

    def __len__(self) -> int:
        return len(self._inputs.tasks)

    def __getitem__(self, index):  # an int (a slice gives a list)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._inputs.read(index % len(self), self._name)


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The plain element-wise mean of the fine-tunes (what data-driven methods fall back to).

    The stack (T, *S) is filled one tensor at a time, so a lazy `tensors` (`FineTuneTensors`)
    holds one input besides it; the mean is that of `torch.stack(tensors)`, bit for bit."""
    first = tensors[0]
    stacked = torch.empty((len(tensors), *first.shape), dtype=first.dtype, device=first.device)
    stacked[0] = first
    del first
    for index in range(1, len(tensors)):
        stacked[index] = tensors[index]
    return stacked.mean(dim=0)
