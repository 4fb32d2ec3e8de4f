"""The spherical family: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

Each treats a tensor (or each row of it) as a vector and interpolates by angle on the sphere
rather than along the chord. All agree with mergekit 0.1.5 (tests/test_mergekit_agreement.py,
tests/test_mergekit_spherical.py).

slerp (Shoemake, 1985), per tensor with a = theta_base, b = theta_other flattened, W = angle(a, b):
    slerp(a, b; t) = sin((1 - t) W) / sin(W) * a + sin(t W) / sin(W) * b
falling back to (1 - t) a + t b when a and b are (anti)parallel (|cos W| > 0.9995).
Symbols -> parameters: t -> `t` (0 gives the base, 1 the other model).

nuslerp (mergekit), exactly two models x_0, x_1 with weights w_0, w_1:
    t = w_1 / (w_0 + w_1)   (0.5 when |w_0 + w_1| < 1e-6)
    v_i = x_i - theta_0 with a base, else v_i = x_i
    theta = [theta_0 +] sin((1 - t) W) / sin(W) * v_0 + sin(t W) / sin(W) * v_1
with W = angle(v_0, v_1) per vector, and (1 - t) v_0 + t v_1 where 1 - cos^2 W <= 1e-16.
Symbols -> parameters: w_i -> per-model `weight` (required); the vectors are the whole
flattened tensor (`nuslerp_flatten`, default true), else each slice along the last dimension,
or along the first dimension with `nuslerp_row_wise` (mergekit's naming, kept).

multislerp (Goddard, "Multi-SLERP"), T models, weights w_t (divided by sum_t w_t with
`normalize_weights`), v_t = x_t - theta_0 with a base, else x_t, all flattened:
    u_t = v_t / (|v_t| + eps)                  points on the unit sphere
    m = sum_t w_t u_t / |sum_t w_t u_t|       their normalised Euclidean mean
    g = sum_t w_t (u_t - <u_t, m> m)          the weighted tangent at m;  L = |g| + eps
    theta = [theta_0 +] (sum_t w_t |v_t|) * (cos(L) m + sin(L) / L * g)
Symbols -> parameters: w_t -> per-model `weight` (required), eps -> `eps`. One model is
returned unchanged. When |sum_t w_t u_t| < eps, two models fall back to w_0 v_0 + w_1 v_1
[+ theta_0]; more models are an error (antipodal inputs whose weights cancel).

karcher (Karcher, 1977; arXiv:2603.04972), the K listed models *and the base when one is given*
(mergekit counts it as one more point), equal weights 1/K:
    u_k = x_k / |x_k| for the kept points, |x_k| > tol;  m = normalised mean of the kept u_k
        (the first kept u_k if that mean is shorter than tol)
    repeat max_iter times, over the kept points:
        g = mean_k theta_k / sin(theta_k) * (u_k - cos(theta_k) m),
        theta_k = arccos<m, u_k> (terms with theta_k < tol left out); stop when |g| < tol;
        m <- normalise(cos|g| m + sin|g| g / |g|)
    theta = (mean_k |x_k|) * m               (this mean over all K points, kept or not)
Symbols -> parameters: `max_iter`, `tol` (also the norm below which a point is left out).

Deviations from mergekit: arithmetic is float32 (float64 stays float64) whatever the input dtype,
where mergekit computes in the config's `dtype`; weights of multislerp that sum to zero with
`normalize_weights` are an error instead of a NaN tensor; the karcher sums visit the base last
(mergekit: at its place in `models:`), which changes float rounding only; negative `eps`,
`tol` or `max_iter` are refused (mergekit takes any float/int).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, NoParams, Params

DOT_THRESHOLD = 0.9995
EPS = 1e-8
NUSLERP_NORM_FLOOR = 1e-7  # mergekit's clamp on |v| before dividing by it
NUSLERP_PARALLEL = 1e-8  # parallel when 1 - cos^2 <= NUSLERP_PARALLEL^2
NUSLERP_WEIGHTLESS = 1e-6  # |w_0 + w_1| below this: t = 0.5


def working_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# -------------------------------------------------------------------------------------- slerp


class SlerpParams(Params):
    t: float = Field(ge=0, le=1, description="interpolation factor from base (0) to other (1)")


def slerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: SlerpParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b, t = base.to(dtype).reshape(-1), tensors[0].to(dtype).reshape(-1), params.t
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > EPS else torch.ones_like(norm_b)
    cos_omega = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    if cos_omega.abs() > DOT_THRESHOLD:
        return ((1 - t) * a + t * b).reshape(base.shape)
    omega = torch.acos(cos_omega)
    sin_omega = torch.sin(omega)
    coef_a = torch.sin((1 - t) * omega) / sin_omega
    coef_b = torch.sin(t * omega) / sin_omega
    return (coef_a * a + coef_b * b).reshape(base.shape)


METHOD = MergeMethod(
    name="slerp",
    description="spherical interpolation between the base and one other model",
    paper="Shoemake 1985; mergekit",
    equation="sin((1-t)W)/sin(W) a + sin(tW)/sin(W) b",
    params=SlerpParams,
    min_models=1,
    max_models=1,
    merge_tensor=slerp,
)


# ------------------------------------------------------------------------------------ nuslerp


class SphericalWeightParams(Params):
    weight: float = Field(description="w_t, this model's weight (required, as in mergekit)")


class NuSlerpParams(Params):
    nuslerp_flatten: bool = Field(True, description="slerp the whole flattened tensor as one vector")
    nuslerp_row_wise: bool = Field(
        False, description="without flatten: slerp the vectors along dim 0 (else along the last dim)"
    )


def slerp_vectors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp every pair of vectors along the last dimension of a, b (..., N), keeping their norms'
    weighting: sin((1-t)W)/sin(W) a + sin(tW)/sin(W) b, and (1-t) a + t b where parallel."""
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    cos_omega = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    parallel = 1 - cos_omega.square() <= NUSLERP_PARALLEL**2
    omega = torch.acos(torch.where(parallel, 0.0, cos_omega))  # parallel rows: pi/2, unused
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return torch.where(parallel, (1 - t) * a + t * b, spherical)


def nuslerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[SphericalWeightParams],
    params: NuSlerpParams,
    generator: torch.Generator,
) -> torch.Tensor:
    w_0, w_1 = (p.weight for p in model_params)
    t = 0.5 if abs(w_0 + w_1) < NUSLERP_WEIGHTLESS else w_1 / (w_0 + w_1)
    dtype = working_dtype(tensors[0])
    a, b = tensors[0].to(dtype), tensors[1].to(dtype)
    if base is not None:
        a, b = a - base.to(dtype), b - base.to(dtype)
    shape = a.shape
    if params.nuslerp_flatten:
        merged = slerp_vectors(a.reshape(-1), b.reshape(-1), t).reshape(shape)
    elif params.nuslerp_row_wise:  # vectors along dim 0: move it last and back
        merged = slerp_vectors(a.transpose(0, -1), b.transpose(0, -1), t).transpose(0, -1)
    else:
        merged = slerp_vectors(a, b, t)
    return merged if base is None else base.to(dtype) + merged


NUSLERP = MergeMethod(
    name="nuslerp",
    description="slerp of two models (or of their task vectors, given a base) at t = w_1/(w_0+w_1)",
    paper="mergekit (NuSLERP); Shoemake 1985",
    equation="[theta_0 +] sin((1-t)W)/sin(W) v_0 + sin(tW)/sin(W) v_1, t = w_1/(w_0+w_1)",
    params=NuSlerpParams,
    model_params=SphericalWeightParams,
    base_role="optional",
    min_models=2,
    max_models=2,
    merge_tensor=nuslerp,
)


# --------------------------------------------------------------------------------- multislerp


class MultiSlerpParams(Params):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, ge=0, description="added to norms before dividing by them")


def multislerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[SphericalWeightParams],
    params: MultiSlerpParams,
    generator: torch.Generator,
) -> torch.Tensor:
    dtype = working_dtype(tensors[0])
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    origin = None if base is None else base.to(dtype).reshape(-1)
    points = torch.stack([tensor.to(dtype).reshape(-1) for tensor in tensors])  # (T, N)
    if origin is not None:
        points -= origin
    weights = torch.tensor([p.weight for p in model_params], dtype=dtype, device=points.device)
    if params.normalize_weights:
        if float(weights.sum()) == 0:
            raise ValueError("weights sum to 0, so normalize_weights=true cannot divide by them")
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(points, dim=-1)  # (T,)
    units = points / (norms[:, None] + params.eps)
    mean = weights @ units  # (N,)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < params.eps:
        if len(tensors) != 2:
            raise ValueError(
                "the weighted mean of the models' directions is zero (antipodal models whose "
                "weights cancel); use other weights"
            )
        merged = weights @ points
    else:
        mean = mean / mean_norm
        tangent = weights @ (units - (units @ mean)[:, None] * mean)  # (N,)
        length = torch.linalg.vector_norm(tangent) + params.eps
        on_sphere = torch.cos(length) * mean + torch.sin(length) / length * tangent
        merged = (weights @ norms) * on_sphere
    if origin is not None:
        merged = merged + origin
    return merged.reshape(tensors[0].shape)


MULTISLERP = MergeMethod(
    name="multislerp",
    description="weighted spherical barycentre of any number of models (or task vectors)",
    paper="Goddard 2024, goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    equation="[theta_0 +] (sum_t w_t |v_t|) (cos(L) m + sin(L)/L g), g = sum_t w_t (u_t - <u_t,m> m)",
    params=MultiSlerpParams,
    model_params=SphericalWeightParams,
    base_role="optional",
    min_models=1,
    merge_tensor=multislerp,
)


# ------------------------------------------------------------------------------------ karcher


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0, description="most fixed-point steps of the Karcher mean")
    tol: float = Field(1e-5, ge=0, description="stop when the step is shorter; smaller norms are left out")


def karcher_mean(units: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The equally weighted Karcher (Frechet) mean of K unit vectors (K, N) on the sphere.

    Each step moves m along the mean of the log maps log_m(u_k) = theta_k/sin(theta_k) *
    (u_k - cos(theta_k) m) by the exponential map, until that mean is shorter than `tol`.
    """
    alpha = 1.0 / units.shape[0]
    mean = units.mean(dim=0)  # (N,)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        cos_theta = (units @ mean).clamp(-1, 1)  # (K,)
        theta = torch.acos(cos_theta)
        coef = torch.where(theta < tol, 0.0, alpha * theta / torch.sin(theta))  # (K,)
        tangent = coef @ units - (coef @ cos_theta) * mean  # sum_k c_k (u_k - cos_k m)
        length = torch.linalg.vector_norm(tangent)
        if length < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        norm = torch.linalg.vector_norm(mean)
        if norm > tol:
            mean = mean / norm
    return mean


def karcher(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: KarcherParams,
    generator: torch.Generator,
) -> torch.Tensor:
    points_in = [*tensors, *([] if base is None else [base])]
    dtype = working_dtype(points_in[0])
    if len(points_in) == 1:
        return points_in[0].to(dtype)
    points = torch.stack([point.to(dtype).reshape(-1) for point in points_in])  # (K, N)
    norms = torch.linalg.vector_norm(points, dim=-1)  # (K,)
    kept = norms > params.tol
    if not bool(kept.any()):
        return torch.zeros_like(points[0]).reshape(points_in[0].shape)
    units = points[kept] / norms[kept, None]
    mean = karcher_mean(units, params.max_iter, params.tol)
    return (norms.mean() * mean).reshape(points_in[0].shape)  # scale: mean norm of all K points


KARCHER = MergeMethod(
    name="karcher",
    description="Karcher mean on the sphere of all listed models (and the base), scaled by mean norm",
    paper="Karcher 1977; arXiv:2603.04972",
    equation="(mean_k |x_k|) * argmin_m sum_k arccos<m, x_k/|x_k|>^2",
    params=KarcherParams,
    base_role="optional",
    min_models=0,
    merge_tensor=karcher,
)

METHODS = (METHOD, NUSLERP, MULTISLERP, KARCHER)
