"""One registry for every pluggable kind of thing: models, datasets, attack suites, sanity checks, trackers.

A :class:`Registry` maps a name to an object (a factory, a spec, a class). Built-in entries register in code with
:meth:`Registry.register`; third-party packages add theirs through the registry's entry-point group
(``[project.entry-points."regdefense.datasets"]`` and so on), found on first use. A built-in name wins over an entry
point of the same name, and a third-party entry that fails to load is left out with a warning, never breaking the
command that asked (timm's ``_registry`` and pytest's plugin discovery work the same way).
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from typing import Callable, Generic, Iterator, TypeVar

from regdefense.base.errors import ConfigError, UserError, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → object for one kind (``kind`` names it in messages), with third parties under ``group``.

    ``adapt`` turns what an entry point loads into the registry's type (a check function into a registered check);
    ``error`` is the :class:`UserError` subclass :meth:`get` raises for an unknown name.
    """

    def __init__(
        self,
        kind: str,
        group: str | None = None,
        *,
        adapt: Callable[[str, object], T] | None = None,
        error: type[UserError] = ConfigError,
        hint: str = "",
    ) -> None:
        self.kind, self.group, self.error, self.hint = kind, group, error, hint
        self._adapt = adapt
        self._builtin: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` (a later registration of the same name replaces it)."""
        self._builtin[name] = obj
        return obj

    def decorator(self, name: str | None = None) -> Callable[[T], T]:
        """``@REGISTRY.decorator()`` registers a function under its own name, or under ``name``."""

        def wrap(obj: T) -> T:
            return self.register(name or getattr(obj, "__name__"), obj)

        return wrap

    def entry_points(self) -> list[md.EntryPoint]:
        """The installed entry points of this registry's group (none without a group)."""
        return list(md.entry_points(group=self.group)) if self.group else []

    def all(self) -> dict[str, T]:
        """Every entry by name: the built-in ones, then the installed third-party ones that load."""
        found = dict(self._builtin)
        for ep in self.entry_points():
            if ep.name in found:
                continue
            try:
                loaded = ep.load()
                found[ep.name] = self._adapt(ep.name, loaded) if self._adapt else loaded
            except Exception as exc:  # a broken third-party package must not break the command that asked
                warnings.warn(
                    f"{self.kind} '{ep.name}' ({ep.value}) failed to load: {type(exc).__name__}: {exc}", stacklevel=2
                )
        return found

    def names(self) -> list[str]:
        """The sorted names :meth:`all` offers (the CLI's help lists come from here)."""
        return sorted(self.all())

    def builtin(self) -> dict[str, T]:
        """Only the entries registered in code (no entry point loaded: cheap, for defaults)."""
        return dict(self._builtin)

    def get(self, name: str) -> T:
        """The entry ``name``, or one line naming the valid ones (and ``hint``, how else to say it)."""
        if name in self._builtin:
            return self._builtin[name]
        found = self.all()
        if name not in found:
            raise self.error(unknown(self.kind, name, found) + (f"{self.hint}" if self.hint else ""))
        return found[name]

    def __contains__(self, name: object) -> bool:
        return name in self._builtin or name in self.all()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
