"""The merge-method registry: built-ins plus plugins from the `merge_harness.methods` group."""

from __future__ import annotations

from functools import cache

from merge_harness.core.errors import MethodError
from merge_harness.core.registry import Registry
from merge_harness.merges import register_builtins
from merge_harness.merges.base import MergeMethod

ENTRY_POINT_GROUP = "merge_harness.methods"


@cache
def method_registry() -> Registry[MergeMethod]:
    registry: Registry[MergeMethod] = Registry("merge method", MethodError, ENTRY_POINT_GROUP)
    register_builtins(registry)
    registry.load_entry_points()
    return registry


def get_method(name: str) -> MergeMethod:
    return method_registry().get(name)
