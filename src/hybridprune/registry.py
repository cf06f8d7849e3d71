"""A tiny name -> object registry for the pluggable parts: models, metrics and datasets.

Their names are declared in `config` (no torch needed to list or validate them); a registry holds the objects
behind those names and refuses to register a name that was not declared, so the two lists cannot drift.
Fixed choices without pluggable objects (allocations, precisions, recipes, kernels) are plain tuples in
`config`, checked with `config.check_name`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from hybridprune.errors import HybridPruneError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps declared names to objects; unknown names fail with the list of valid ones.

    Example:
        >>> metrics = Registry("metric", ("l1",))
        >>> @metrics.register("l1")
        ... def l1(): ...
        >>> metrics.get("l1") is l1
        True
    """

    def __init__(self, kind: str, declared: tuple[str, ...]) -> None:
        self.kind = kind
        self.declared = declared
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if name not in self.declared:  # a developer's slip: declare the name in config first
            raise KeyError(f"{self.kind} {name!r} is not declared; add it to the names in hybridprune.config")

        def add(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise HybridPruneError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def missing(self) -> list[str]:
        """Declared names with nothing registered (the tests keep this empty)."""
        return [n for n in self.declared if n not in self._items]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
