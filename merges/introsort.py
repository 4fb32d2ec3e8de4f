"""Which entries torch's CPU sort puts before a cut, without sorting everything.

mergekit picks magnitude-trimmed entries with `torch.argsort` (TIES: the first k of the descending
order; Breadcrumbs: a window of the ascending order). On the CPU that sort is libstdc++'s
`std::sort` (introsort: median-of-3 quicksort down to blocks of 16, then one insertion sort)
on (value, index) pairs compared by value alone, so where equal values straddle a cut, *which*
of them land before it depends on the whole run of the algorithm.

A quicksort never moves an entry across a partition boundary once it is drawn, so the set of
entries before a cut is decided by the partitions of the ranges that contain the cut; everything
else only reorders entries within one side. `window_indices` replays exactly those partitions
(the same pivots, the same swaps, vectorised with numpy) and finishes the small block around
each cut as the final insertion sort does (a stable sort of the block): O(n) work instead of
O(n log n), the same set as the full sort. Where the replay would reach introsort's depth limit
(its heapsort fallback, not replayed) it returns None and the caller sorts.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16  # libstdc++'s _S_threshold: ranges of at most this many are left to insertion sort


def window_indices(keys: np.ndarray, start: int, stop: int) -> np.ndarray | None:
    """Original indices of the entries at [start, stop) of `std::sort(keys)` (ascending, by value).

    `keys`: a 1-D float array without NaN; it is reordered in place (pass a copy). For torch's
    descending order pass `-values`: the comparison `a > b` of the descending sort is `-a < -b`.
    """
    count = keys.size
    cuts = [c for c in (start, stop) if 0 < c < count]
    key = keys
    index = np.arange(count, dtype=np.int64 if count >= 2**31 else np.int32)
    if cuts and count > 1:
        depth = 2 * (count.bit_length() - 1)
        pending = [(0, count, depth)]
        while pending:
            if not _settle(key, index, *pending.pop(), cuts, pending):
                return None
    return index[start:stop]


def _settle(key, index, first: int, last: int, depth: int, cuts: list[int], pending: list) -> bool:
    """Partition [first, last) as `__introsort_loop` does, following only the sides that hold a
    cut; then stable-sort the final block (the insertion sort). False: depth limit reached."""
    while last - first > BLOCK:
        if depth == 0:
            return False
        depth -= 1
        cut = _partition(key, index, first, last)
        if any(cut < c < last for c in cuts):
            pending.append((cut, last, depth))  # introsort recurses on the right side ...
        if not any(first < c < cut for c in cuts):
            return True
        last = cut  # ... and loops on the left one
    if any(first < c < last for c in cuts):
        order = np.argsort(key[first:last], kind="stable")
        key[first:last] = key[first:last][order]
        index[first:last] = index[first:last][order]
    return True


def _partition(key, index, first: int, last: int) -> int:
    """`__unguarded_partition_pivot`: median of (first+1, mid, last-1) moved to `first`, then a
    Hoare partition of [first+1, last) around it. Returns the cut; swaps as the C++ loop does.

    The loop swaps the i-th entry >= pivot from the left with the i-th entry <= pivot from the
    right while the former lies left of the latter (both sequences are monotone, so the number
    of swaps m is found by bisection), and stops at the next entry >= pivot after the m-th left
    one or at the m-th right one (it now holds an entry >= pivot), whichever comes first.
    """
    _swap(key, index, first, _median_of_three(key, first + 1, first + (last - first) // 2, last - 1))
    pivot = key[first]
    segment = key[first + 1 : last]
    lefts = np.flatnonzero(segment >= pivot)  # where the left scan stops: !(x < pivot)
    rights = np.flatnonzero(segment <= pivot)  # where the right scan stops: !(pivot < x)
    low, high = 0, min(lefts.size, rights.size)  # pair i swaps iff lefts[i] < rights[-1 - i]
    while low < high:
        middle = (low + high) // 2
        if lefts[middle] < rights[rights.size - 1 - middle]:
            low = middle + 1
        else:
            high = middle
    swaps = low
    base = first + 1
    if swaps:
        left_at = lefts[:swaps] + base
        right_at = rights[rights.size - swaps :][::-1] + base
        for array in (key, index):
            held = array[left_at]
            array[left_at] = array[right_at]
            array[right_at] = held
        stop = int(rights[rights.size - swaps])
        if swaps < lefts.size:
            stop = min(stop, int(lefts[swaps]))
    else:
        stop = int(lefts[0])  # the median of three leaves an entry >= pivot in the range
    return base + stop


def _median_of_three(key, a: int, b: int, c: int) -> int:
    """`__move_median_to_first`'s choice among positions a, b, c (comparisons `x < y`)."""
    ka, kb, kc = key[a], key[b], key[c]
    if ka < kb:
        if kb < kc:
            return b
        return c if ka < kc else a
    if ka < kc:
        return a
    return c if kb < kc else b


def _swap(key, index, i: int, j: int) -> None:
    if i != j:
        key[i], key[j] = key[j], key[i]
        index[i], index[j] = index[j], index[i]
