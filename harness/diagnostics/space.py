"""The task-vector space of a base model: parameters theta_0 + sum_t a_t tau_t, in memory.

The base model is built once (float32); every point of the space is a {name: tensor} dict
handed to `torch.func.functional_call`, so no model is ever rebuilt or written to disk. Task
vectors tau_t = theta_t - theta_0 come from
`merge_harness.merges.task_vectors.task_vectors`, tensor by tensor.
Sized for diagnostics on small models: all T task vectors are held in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from merge_harness.core.errors import CheckpointError
from merge_harness.io.checkpoint import Checkpoint
from merge_harness.merge.data_driven import reference_model
from merge_harness.merges.task_vectors import task_vectors

Params = dict[str, torch.Tensor]


@dataclass
class TaskVectorSpace:
    """A base model, its parameters theta_0 and one task vector per task (same names)."""

    model: torch.nn.Module
    base: Params
    taus: dict[str, Params]

    @property
    def tasks(self) -> list[str]:
        return list(self.taus)

    def point(self, coefficients: Mapping[str, float]) -> Params:
        """theta_0 + sum_t a_t tau_t for the tasks named in `coefficients` (others: a_t = 0)."""
        params = dict(self.base)
        for task, a in coefficients.items():
            if a != 0:
                tau = self.taus[task]
                params = {name: value + a * tau[name] for name, value in params.items()}
        return params

    def layer_params(self, prefix: str, coefficients: Mapping[str, float]) -> Params:
        """Like `point`, restricted to names under `prefix` and keyed relative to it."""
        start = len(prefix)
        params = {n[start:]: v for n, v in self.base.items() if n.startswith(prefix)}
        for task, a in coefficients.items():
            if a != 0:
                tau = self.taus[task]
                params = {n: v + a * tau[prefix + n] for n, v in params.items()}
        return params


def load_space(base: str | Path, finetunes: Mapping[str, str | Path], device: str = "cpu") -> TaskVectorSpace:
    """The base model in memory and tau_t for every fine-tune (task -> model directory)."""
    base_ckpt = Checkpoint.open(Path(base))
    model = reference_model(base_ckpt, device)
    own = dict(model.named_parameters())  # tied weights appear once
    checkpoints = {task: Checkpoint.open(Path(path)) for task, path in finetunes.items()}
    theta_0: Params = {}
    taus: dict[str, Params] = {task: {} for task in checkpoints}
    for name, param in own.items():
        for ckpt in checkpoints.values():
            if name not in ckpt.tensors:
                raise CheckpointError(f"{ckpt.path}: tensor {name!r} of the base model is missing")
        theta_0[name] = param.detach()
        stacked = task_vectors(theta_0[name], [ckpt.read(name).to(device) for ckpt in checkpoints.values()])
        for index, task in enumerate(checkpoints):
            taus[task][name] = stacked[index]
    return TaskVectorSpace(model, theta_0, taus)


def logits(space: TaskVectorSpace, params: Params, input_ids, attention_mask) -> torch.Tensor:
    """(b, L, V) float32 logits of the base architecture at parameters `params`."""
    out = functional_call(
        space.model,
        params,
        (),
        {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False},
    )
    return out.logits.float()
