"""A generic, typed name -> object registry with did-you-mean lookups and entry-point plugins.

Built-in entries are registered explicitly (see
`merge_harness.merges.register_builtins`); third-party packages
add theirs through an entry point group whose target is a `register(registry)` function, the same
function shape the built-ins use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from merge_harness.core.errors import HarnessError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise `error_type` with close matches suggested."""

    def __init__(self, kind: str, error_type: type[HarnessError], entry_point_group: str = ""):
        self.kind = kind
        self.error_type = error_type
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise self.error_type(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self.error_type(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(self._items))
        return f"unknown {self.kind} {name!r}{hint} (known: {known})"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def load_entry_points(self) -> None:
        """Call every `register(registry)` function published under the entry point group."""
        if not self.entry_point_group:
            return
        for entry_point in entry_points(group=self.entry_point_group):
            register: Callable[[Registry[T]], None] = entry_point.load()
            try:
                register(self)
            except HarnessError:
                raise
            except Exception as exc:  # a broken plugin must say which one it is
                raise self.error_type(
                    f"plugin {entry_point.name!r} ({entry_point.value}) failed to register: {exc}"
                ) from exc
