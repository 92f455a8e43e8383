"""Name -> function registries for the swappable math (CONTRIBUTING.md §7).

What: a tiny typed mapping used for prototype kernels (method §2.6), advantage estimators (method
§2.2)
and policy losses (method §2.3). Why: configs name the variant as a string, and an unknown name must
fail at config time with an error that lists the valid choices, instead of a bare ``KeyError``
deep inside a training step. Departs from nothing in the paper (pure plumbing).

Shape legend: none (registries hold functions, not tensors).
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, Tuple, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named collection of functions: ``reg.register("name")(fn)``, ``reg.get("name")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding ``fn`` under ``name``; registering a name twice is an error."""

        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        """The function registered as ``name``; ValueError listing the choices otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choices: {', '.join(self.names())}"
            ) from None

    def check(self, name: str, field: str) -> None:
        """Config validation: ValueError naming ``field`` and the choices if ``name`` is unknown."""
        if name not in self._entries:
            raise ValueError(
                f"{field} must be one of {{{', '.join(self.names())}}} (got {name!r})"
            )

    def names(self) -> Tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
