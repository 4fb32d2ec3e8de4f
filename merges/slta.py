"""SLTA: merge submodules with coefficients solved from their (near-)linearity in the weights.

Paper: Dai et al., "Leveraging Submodule Linearity Enhances Task Arithmetic Performance in LLMs",
ICLR 2025 (Algorithm 1; code github.com/deep-analysis-research/SLTA).

Premise: a submodule f(x; theta) -- a decoder layer, or its attention block, or its MLP block --
is close to linear in its weights around the pre-trained theta_0:

    f(x; theta_0 + sum_k a_k tau_k) ~= f(x; theta_0) + sum_k a_k D_k(x),
    D_k(x) = f(x; theta_k) - f(x; theta_0),      tau_k = theta_k - theta_0.

Algorithm 1: H^1_t = embeddings of N examples of task t; H^{i+1}_t = f(H^i_t; theta_0^i), i.e.
inputs travel through the *pre-trained* layers only. Per submodule i, solve a^i in R^T and set

    theta_merge^i = theta_0^i + sum_t a^i_t tau^i_t.

The paper's closed form (its Eq. 12) is not available to us. This module implements the
derivation from the same premise given in SPEC section 4, documented here as such. Per submodule:

    min_a  sum_t sum_{x in H_t} || sum_k a_k D_k(x) - D_t(x) ||^2      (x: non-padding tokens)

i.e. on task t's inputs the merged submodule should move the output as fine-tune t does. Its
normal equations A a = b, accumulated in float64:

    A_jk = sum_t sum_{x in H_t} <D_j(x), D_k(x)>,      b_j = sum_t sum_{x in H_t} <D_j(x), D_t(x)>

`cross_task=False` (the diagonal approximation) keeps, in row j, only the inputs of task j:

    A_jk = sum_{x in H_j} <D_j(x), D_k(x)>,            b_j = sum_{x in H_j} <D_j(x), D_j(x)>

which is the condition d/da_j L_j(a) = 0 with L_j(a) = sum_{x in H_j} ||sum_k a_k D_k - D_j||^2:
every task tunes its own coefficient for its own inputs, given the others (A is then not
symmetric in general).
Solve: float64 `solve(A + ridge * trace(A)/T * I, b)`; when A is singular (condition number
above 1e12, e.g. two identical fine-tunes) the minimum-norm least-squares solution of A a = b is
used instead and a warning logs the condition number.

Granularity (symbols -> parameters): `layer` gives one a^i per decoder layer (f = the layer, its
output minus its input; the residual cancels in D anyway); `attn_mlp` one for each layer's
attention block (input_layernorm + self_attn on the layer input) and MLP block
(post_attention_layernorm + mlp on h + attn_0(h)), outputs without the residual; `model` (an
ablation) sums the layer-level normal equations of all layers and solves one a for the whole
model. N -> `num_samples`, eps -> `ridge`. `scale` (an ablation, not in the paper) multiplies every solved a
by one factor c, e.g. chosen on held-out rows by a `search:`.
Parameters outside the decoder layers (embeddings, final norm, lm_head) merge by task arithmetic
with coefficient `non_layer_coefficient`, by default the mean over all solved submodules of a_t
(per task).
Deviations: T = 1 is allowed and gives a = 1/(1 + ridge) ~= 1, i.e. the fine-tune itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from merge_harness.core.errors import MethodError
from merge_harness.core.results import Coefficient
from merge_harness.merges.base import MergeMethod
from merge_harness.merges.model_level import (
    CalibratedParams,
    CalibrationInputs,
    FineTuneTensors,
    LazyState,
    ModelMerge,
    Submodule,
    reused,
)
from merge_harness.merges.task_vectors import task_vectors

logger = logging.getLogger(__name__)

MAX_CONDITION = 1e12  # above this, A is treated as singular (float64 keeps ~16 digits)
NON_LAYER = "non_layer"


class SltaParams(CalibratedParams):
    granularity: Literal["model", "layer", "attn_mlp"] = Field(
        "attn_mlp", description="one coefficient vector per model | layer | attention/MLP block"
    )
    cross_task: bool = Field(True, description="false: row j uses only task j's inputs")
    ridge: float = Field(1e-8, ge=0, description="eps of the ridge eps * trace(A)/T * I")
    non_layer_coefficient: float | None = Field(
        None, description="coefficient of embeddings/norm/lm_head; default: mean of solved a_t"
    )
    scale: float = Field(
        1.0, gt=0, description="c: every solved a_t multiplied by one factor (an ablation; 1 = the paper)"
    )


# ----------------------------------------------------------------------------- normal equations


@dataclass
class NormalEquations:
    """A a = b for one submodule: A (T, T) and b (T,), float64, summed over token batches, and
    `target` = sum_t sum_{x in H_t} ||D_t(x)||^2, so that the objective at any a is
    a^T A a - 2 a^T b + target (`residual`)."""

    A: torch.Tensor
    b: torch.Tensor
    target: float = 0.0

    @classmethod
    def zeros(cls, count: int) -> NormalEquations:
        return cls(torch.zeros(count, count, dtype=torch.float64), torch.zeros(count, dtype=torch.float64))

    def add(self, other: NormalEquations) -> None:
        self.A += other.A
        self.b += other.b
        self.target += other.target

    def residual(self, a: torch.Tensor) -> float:
        """sum_t sum_x ||sum_k a_k D_k(x) - D_t(x)||^2 (cross-task equations; SPEC section 4)."""
        a = a.to(torch.float64)
        return float(a @ self.A @ a - 2 * a @ self.b) + self.target


def normal_equations(deltas: torch.Tensor, task: int, cross_task: bool = True) -> NormalEquations:
    """The contribution of a batch of task `task`'s inputs: deltas (T, n_tokens, d_out)."""
    flat = deltas.reshape(deltas.shape[0], -1).to(torch.float64)  # (T, n * d)
    gram = (flat @ flat.T).cpu()  # gram[j, k] = sum_x <D_j(x), D_k(x)>
    target = float(gram[task, task])
    if cross_task:
        return NormalEquations(gram, gram[:, task].clone(), target)
    count = gram.shape[0]
    equations = NormalEquations.zeros(count)
    equations.A[task] = gram[task]
    equations.b[task] = gram[task, task]
    equations.target = target
    return equations


def solve_coefficients(
    A: torch.Tensor, b: torch.Tensor, ridge: float = 1e-8, where: str = ""
) -> torch.Tensor:
    """a (T,) float64 from A a = b: ridge-regularised solve, least squares when A is singular."""
    A_np = A.detach().cpu().numpy().astype(np.float64)
    b_np = b.detach().cpu().numpy().astype(np.float64)
    if not (np.isfinite(A_np).all() and np.isfinite(b_np).all()):
        raise MethodError(f"slta: normal equations of {where or 'a submodule'} contain NaN/inf")
    count = len(b_np)
    with np.errstate(all="ignore"):
        condition = float(np.linalg.cond(A_np)) if A_np.any() else float("inf")
    if not np.isfinite(condition) or condition > MAX_CONDITION:
        logger.warning(
            "slta: normal equations of %s are singular (condition number %.3g); using the "
            "least-squares solution", where or "a submodule", condition,
        )
        solution = np.linalg.lstsq(A_np, b_np, rcond=None)[0]
    else:
        shift = ridge * np.trace(A_np) / count
        solution = np.linalg.solve(A_np + shift * np.eye(count), b_np)
    return torch.from_numpy(solution)


def combine(base: torch.Tensor, tensors: Sequence[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """theta_0 + sum_t a_t (theta_t - theta_0), in float32 (float64 stays float64).

    Memory: base, the task vectors (T, *S) and the result, plus one of `tensors` at a time when
    it reads them lazily (`FineTuneTensors`)."""
    deltas = task_vectors(base, tensors)  # (T, *S)
    weights = a.to(deltas.dtype).to(deltas.device)
    merged = torch.tensordot(weights, deltas, dims=1)
    del deltas
    return merged.add_(base.to(merged.dtype))  # = base + sum_t a_t tau_t (addition commutes exactly)


# ---------------------------------------------------------------------------------- the method


def collect_equations(inputs: CalibrationInputs, params: SltaParams) -> dict[Submodule, NormalEquations]:
    """Stream the features once and sum each submodule's normal equations."""
    granularity = "attn_mlp" if params.granularity == "attn_mlp" else "layer"
    count = len(inputs.tasks)
    systems: dict[Submodule, NormalEquations] = {}
    for batch in inputs.submodule_deltas(granularity):
        increment = normal_equations(batch.deltas, batch.task, params.cross_task)
        if not (torch.isfinite(increment.A).all() and torch.isfinite(increment.b).all()):
            raise MethodError(
                f"slta: features of {batch.submodule.name} on task {inputs.tasks[batch.task]!r} "
                "contain NaN/inf (a fine-tune produces non-finite activations)"
            )
        systems.setdefault(batch.submodule, NormalEquations.zeros(count)).add(increment)
    if not systems:
        raise MethodError("slta: no features were collected (no decoder layers or no tokens)")
    return systems


def solve_all(
    systems: dict[Submodule, NormalEquations], params: SltaParams
) -> dict[str, tuple[tuple[Submodule, ...], torch.Tensor]]:
    """Solved a per coefficient group: {name: (submodules it covers, a (T,))}."""
    if params.granularity == "model":
        total = NormalEquations.zeros(len(next(iter(systems.values())).b))
        for equations in systems.values():
            total.add(equations)
        a = solve_coefficients(total.A, total.b, params.ridge, "the whole model")
        return {"model": (tuple(systems), a)}
    return {
        sub.name: ((sub,), solve_coefficients(eq.A, eq.b, params.ridge, sub.name))
        for sub, eq in systems.items()
    }


def merge_slta(inputs: CalibrationInputs, params: SltaParams) -> ModelMerge:
    """Algorithm 1: solve a per submodule, then theta_0 + sum_t a_t tau_t tensor by tensor
    (lazily: each merged tensor is made when the engine takes it)."""
    features = "attn_mlp" if params.granularity == "attn_mlp" else "layer"
    systems = reused(inputs, ("slta", features, params.cross_task), lambda: collect_equations(inputs, params))
    solved = solve_all(systems, params)
    solved = {name: (subs, a * params.scale) for name, (subs, a) in solved.items()}
    mean = torch.stack([a for _, a in solved.values()]).mean(dim=0)
    non_layer = mean if params.non_layer_coefficient is None else torch.full_like(
        mean, float(params.non_layer_coefficient)
    )
    owners = [(subs, a) for subs, a in solved.values()]

    def merged(name: str) -> torch.Tensor:
        a = next((a for subs, a in owners if any(s.owns(name) for s in subs)), non_layer)
        return combine(inputs.read(None, name), FineTuneTensors(inputs, name), a)

    coefficients = [
        Coefficient(group, task, float(value))
        for group, (_, a) in [*solved.items(), (NON_LAYER, ((), non_layer))]
        for task, value in zip(inputs.tasks, a.tolist())
    ]
    return ModelMerge(LazyState(inputs.tensor_names(), merged), coefficients)


METHOD = MergeMethod(
    name="slta",
    description="per-submodule task-arithmetic coefficients solved on calibration features",
    paper="Dai et al., ICLR 2025 (Leveraging Submodule Linearity Enhances Task Arithmetic)",
    equation=(
        "theta^i = theta_0^i + sum_t a^i_t tau^i_t, a^i = argmin sum_t sum_{x in H_t} "
        "|| sum_k a_k D^i_k(x) - D^i_t(x) ||^2"
    ),
    params=SltaParams,
    base_role="required",
    merge_model=merge_slta,
)
