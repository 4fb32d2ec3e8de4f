"""Merge methods, one module per family. `register_builtins` is the one list of built-ins.

Third-party packages publish a `register(registry)` function under the entry point group
`merge_harness.methods` and call `registry.register(name, MergeMethod(...))`, exactly as below.
"""

from __future__ import annotations

from merge_harness.core.registry import Registry
from merge_harness.merges import (
    arcee_fusion,
    fisher,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    slta,
    task_arithmetic,
)
from merge_harness.merges.base import MergeMethod


def register_builtins(registry: Registry[MergeMethod]) -> None:
    for method in (
        linear.METHOD,
        passthrough.METHOD,
        *task_arithmetic.METHODS,
        *slerp.METHODS,
        model_stock.METHOD,
        slta.METHOD,
        regmean.METHOD,
        fisher.METHOD,
        sce.METHOD,
        *ram.METHODS,
        nearswap.METHOD,
        arcee_fusion.METHOD,
    ):
        registry.register(method.name, method)
