"""Arcee Fusion: take the other model's update only where it is an outlier in importance.

Reference: Arcee AI (arcee.ai), no paper; the algorithm as mergekit implements it.
Per tensor, with a = theta_0 (the base), b = theta_1 and tau = b - a; softmax runs over the last
axis (each row of a matrix; the whole vector of a 1-D tensor):

    p = softmax(b) + 1e-8,  q = softmax(a) + 1e-8
    I = |tau| * KL(p || q),  KL(p || q) = sum_last p log(p / q)      (one KL per row)
    threshold = Q2(I) + 1.5 (Q3(I) - Q1(I))                          (Tukey's fence, from the median)
    theta = a + [I >= threshold] * tau

Q_i is the order statistic at rank floor(q_i (n - 1)) of I's n entries, q = 0.25, 0.5, 0.75 (no
interpolation); where most scores are equal (Q1 = Q3) the fence is Q2 itself, and every entry
scoring at least Q2 is taken. As mergekit, a tensor of more than 1,000,000 entries estimates the
Q_i from 1,000,000 entries drawn with replacement; we draw those from the engine's per-tensor
generator (on the CPU), mergekit from torch's global one (the same draws for the same seed), so
only such tensors can differ from a mergekit run, by the sample.
No parameters; exactly one model besides the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_harness.merges.base import MergeMethod, NoParams
from merge_harness.merges.sparsify import ranked_values

PROBABILITY_EPS = 1e-8
QUANTILE_SAMPLE = 1_000_000


def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """I = |other - base| * KL(softmax(other) || softmax(base)) over the last axis, shape (*S)."""
    p = torch.softmax(other, dim=-1) + PROBABILITY_EPS
    q = torch.softmax(base, dim=-1) + PROBABILITY_EPS
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (..., 1)
    return (other - base).abs() * divergence


def upper_fence(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Q2 + 1.5 (Q3 - Q1) of `scores`, from a sample of QUANTILE_SAMPLE entries if there are more."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    last = flat.numel() - 1
    q1, q2, q3 = ranked_values(flat, [last // 4, last // 2, 3 * last // 4])
    q1, q2, q3 = torch.tensor([q1, q2, q3], dtype=scores.dtype, device=scores.device)
    return q2 + 1.5 * (q3 - q1)


def arcee_fusion(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: NoParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.to(dtype), tensors[0].to(dtype)
    scores = importance(a, b)
    keep = scores >= upper_fence(scores, generator)
    return a + (b - a) * keep


METHOD = MergeMethod(
    name="arcee_fusion",
    description="take the other model's update where its |tau| * KL importance is an outlier",
    paper="arcee.ai (Arcee Fusion; mergekit)",
    equation="a + [I >= Q2(I) + 1.5 IQR(I)] (b - a), I = abs(b - a) KL(softmax(b), softmax(a))",
    max_models=1,
    random=True,
    merge_tensor=arcee_fusion,
)
