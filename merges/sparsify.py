"""Sparsifiers: which entries of one task vector survive, and how survivors are rescaled.

Each function takes one task vector tau (*S) and returns a tensor of the same shape with dropped
entries set to 0. Random sparsifiers draw from the `generator` they are given, so the engine can
seed them per tensor name and results do not depend on the order tensors are processed in. The
draws happen on the CPU (a CPU generator) whatever device the tensor is on: CUDA's generators
give other streams for the same seed, and a merge must be the same on a GPU box and in CI.

Tie rule (as mergekit, which sorts): the magnitude sparsifiers keep exactly the count mergekit
keeps -- TIES k = max(1, int(density * n)); Breadcrumbs int(density * n) after dropping
int(gamma * n) -- and when entries of equal |tau| straddle a cut, the ones kept are those
mergekit keeps: the first k of `torch.argsort(|tau|, descending=True)` (TIES), positions
[n_bottom, n_bottom + keep) of `torch.sort(|tau|).indices` (Breadcrumbs), on the CPU in float32.
That order is torch's CPU introsort (not stable: it is neither lowest- nor highest-index first, but
it is deterministic for a given input and torch build, and mergekit calls the same function, so the
two agree on any build). DELLA's ranks are `argsort(argsort(|tau|))` per row on the CPU, likewise.
No full sort is paid: without a tie straddling a cut an O(n) selection finds the cut and the
kept set is the only one any sort can give; with one, `merge_harness.merges.introsort` replays
the partitions of torch's sort that decide the cut (O(n), the same set as the sort).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from merge_harness.merges.introsort import window_indices

RescaleNorm = Literal["l1", "inverse_density"]


def rescale(masked: torch.Tensor, original: torch.Tensor, density: float, norm: RescaleNorm) -> torch.Tensor:
    """Scale survivors back up: by 1/density (DARE paper) or to the original L1 norm (mergekit).

    The L1 variant equals 1/density in expectation; it is skipped when either norm is ~0.
    """
    if norm == "inverse_density":
        return masked / density
    before, after = original.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def sorted_window_mask(magnitudes: torch.Tensor, start: int, count: int, descending: bool) -> torch.Tensor:
    """Entries at [start, start + count) of mergekit's sort of |tau| (float32, on the CPU).

    mergekit takes `argsort(descending=True)[:k]` for TIES and `sort().indices[a:b]` for
    Breadcrumbs; torch's CPU sort is not stable, so the direction changes which tied entries come
    first and is kept as mergekit calls it. The partitions that decide the window are replayed
    (`window_indices`); only where that replay gives up (introsort's depth limit) is the sort run.
    """
    flat = magnitudes.reshape(-1).to(device="cpu", dtype=torch.float32)
    keys = np.negative(flat.numpy()) if descending else flat.numpy().copy()  # desc.: a > b is -a < -b
    chosen = window_indices(keys, start, start + count)
    if chosen is None:
        chosen = torch.sort(flat, descending=descending).indices[start : start + count]
    else:
        chosen = torch.from_numpy(chosen)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[chosen] = True
    return mask.reshape(magnitudes.shape).to(magnitudes.device)


def ranked_values(flat: torch.Tensor, positions: list[int]) -> list[float]:
    """The values at `positions` of the ascending order of `flat`, by selection (O(n)), not a sort.

    On the CPU, numpy's introselect is 3-15x faster than `torch.kthvalue` here.
    """
    if flat.device.type == "cpu":
        return np.partition(flat.numpy(), positions)[positions].tolist()
    return [torch.kthvalue(flat, p + 1).values.item() for p in positions]


def window_mask(magnitudes: torch.Tensor, start: int, count: int) -> torch.Tensor | None:
    """Entries at ascending ranks [start, start + count) when no tie straddles either end, else None.

    Without a straddling tie the window holds the same entries whatever order a sort gives equal
    values, so selection (O(n)) finds mergekit's set; with one, the caller sorts as mergekit does.
    """
    flat = magnitudes.reshape(-1).float()
    last = start + count - 1
    top = last == flat.numel() - 1  # a window reaching the largest value needs no upper cut
    values = ranked_values(flat, [start] if top else [start, last])
    mask = flat >= values[0]
    if not top:
        mask &= flat <= values[1]
    return mask.reshape(magnitudes.shape) if int(torch.count_nonzero(mask)) == count else None


def apply_mask(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`tensor * mask` for a boolean mask: the same numbers (x * 1, x * 0, signed zeros included).

    torch multiplies float by bool through a slow type-promotion path (5x numpy's on a 28M
    float32 tensor here), so on the CPU the product is taken by numpy.
    """
    numpy_ok = tensor.dtype in (torch.float32, torch.float64) and tensor.is_contiguous()
    if tensor.device.type == "cpu" and numpy_ok:
        return torch.from_numpy(np.multiply(tensor.numpy(), mask.contiguous().numpy()))
    return tensor * mask


def sparsify_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep exactly k = max(1, int(density * n)) entries of largest magnitude.

    Ties at the cut are broken as mergekit breaks them (see the module docstring).
    """
    if density >= 1 or tensor.numel() == 0:
        return tensor
    count = tensor.numel()
    k = max(1, int(density * count))
    magnitudes = tensor.abs()
    mask = window_mask(magnitudes, count - k, k)
    if mask is None:  # a tie straddles the cut: mergekit's sort decides which of the tied stay
        mask = sorted_window_mask(magnitudes, 0, k, descending=True)
    return apply_mask(tensor, mask)


def keep_mask(probabilities: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """1 with each entry's probability, else 0: drawn on the CPU generator, returned on `device`."""
    return torch.bernoulli(probabilities.cpu(), generator=generator).to(device)


def sparsify_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE drop: keep each entry independently with probability `density`."""
    if density >= 1:
        return tensor
    return tensor * keep_mask(torch.full(tensor.shape, density, dtype=tensor.dtype), generator, tensor.device)


def sparsify_outliers(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest `gamma` fraction, then the smallest, keep `density`.

    Counts as mergekit's: keep = int(density * n), n_top = int(gamma * n) (shrunk so that `keep`
    survives); ties at either cut are broken as mergekit breaks them (see the module docstring).
    """
    if density >= 1:
        return tensor
    count = tensor.numel()
    keep = int(density * count)
    n_top = int(gamma * count)
    n_bottom = max(0, count - keep - n_top)
    if keep == 0:
        return torch.zeros_like(tensor)
    magnitudes = tensor.abs()
    mask = window_mask(magnitudes, n_bottom, keep)
    if mask is None:  # a tie straddles a cut: mergekit's sort decides which of the tied stay
        mask = sorted_window_mask(magnitudes, n_bottom, keep, descending=False)
    return apply_mask(tensor, mask)


def magprune_probabilities(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA: keep-probabilities rising linearly with magnitude rank within each row.

    p = (density - epsilon) + 2 * epsilon * rank_norm, rank_norm in [0, 1] per row, so the mean
    keep-rate is `density` and larger entries are kept more often. Ranked as mergekit ranks (ties
    in the order of torch's CPU argsort) and returned on the CPU, where the mask is drawn.
    """
    rows = tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)
    magnitudes = rows.abs().cpu()  # ranked on the CPU: CUDA's sort orders ties otherwise
    ranks = magnitudes.argsort(dim=1).argsort(dim=1).to(rows.dtype) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def sparsify_magprune(
    tensor: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """DELLA drop: keep each entry with its magnitude-ranked probability."""
    if density >= 1:
        return tensor
    probabilities = magprune_probabilities(tensor, density, epsilon)
    keep = keep_mask(probabilities, generator, tensor.device)
    return (tensor.reshape(keep.shape) * keep).reshape(tensor.shape)
