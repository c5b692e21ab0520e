"""One registry pattern for every zoo (backbones, losses, adapters, optimizers, data sources...).

Each zoo is a :class:`Registry` keyed by short names. Components register with a decorator and are
built with ``registry.build(name, **kwargs)``; an unknown name fails with the list of known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from unirep.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders (classes or factory functions).

    Example::

        FEATURE_LOSSES = Registry("feature loss")

        @FEATURE_LOSSES.register("cka_linear")
        class LinearCKALoss(nn.Module): ...

        loss = FEATURE_LOSSES.build("cka_linear")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that adds a builder under ``name`` (names are unique per registry)."""

        def add(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = builder
            return builder

        return add

    def get(self, name: str) -> Callable[..., T]:
        """The builder registered as ``name``; unknown names list the valid choices."""
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> T:
        """Build the component registered as ``name`` with keyword arguments."""
        builder = self.get(name)
        try:
            return builder(**kwargs)
        except TypeError as err:
            raise TypeError(f"cannot build {self.kind} {name!r} with {kwargs}: {err}") from err

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
