"""A tiny typed registry: names -> objects, with clear errors for duplicates and unknown names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])  # a class or a function: registered under its ``__name__``


class UnknownNameError(KeyError):
    """Raised when a registry lookup misses; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a plain sentence.
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps lowercase names to objects (classes or functions).

    Args:
        kind: what the registry holds, used in error messages ("method", "model", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` (default: its lowercased ``__name__``)."""

        def deco(obj: T) -> T:
            key = (name or obj.__name__).lower()
            if key in self._items:
                raise ValueError(f"duplicate {self.kind} name {key!r}: already registered as {self._items[key]!r}")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``; raises UnknownNameError listing valid names."""
        key = name.lower()
        if key not in self._items:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}")
        return self._items[key]

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """Sorted (name, object) pairs."""
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
