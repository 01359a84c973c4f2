"""Discovery and activation of defenses.

Every defense, built-in or third-party, is an entry point in group ``regdefense`` whose name is the
defense name and whose value points at the defense class (``module:Class``). Installed is not
active: :func:`catalogue` lists what is installed, :func:`activate` builds a plugin manager for the
stack a run asks for.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from regdefense.base.errors import PluginError, did_you_mean, first_line, unknown
from regdefense.host import contract, hookspecs
from regdefense.host.core import CorePlugin
from regdefense.host.defense import declared

GROUP = "regdefense"


class ContractWarning(UserWarning):
    """A defense reads step data that no active defense publishes (it falls back or does nothing)."""


@dataclass
class PluginInfo:
    """One installed defense, as listed by ``regdefense plugins``."""

    name: str
    value: str  #: the entry point's ``module:Class``
    dist: str
    version: str
    cls: type | None = None
    error: str | None = None  #: why it cannot be used (import failure, not a defense class, ...)

    @property
    def builtin(self) -> bool:
        return self.dist == "regdefense"

    @property
    def hooks(self) -> list[str]:
        if self.cls is None:
            return []
        return sorted(n for n in dir(self.cls) if n.startswith("regdefense_"))

    @property
    def wrappers(self) -> list[str]:
        """Hooks this defense implements as a wrapper (a modifier of another defense's job)."""
        return [h for h in self.hooks if (getattr(getattr(self.cls, h), "regdefense_impl", None) or {}).get("wrapper")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.dist,
            "version": self.version,
            "entry_point": self.value,
            "builtin": self.builtin,
            "hooks": self.hooks,
            "wrappers": self.wrappers,
            **{
                kind: [
                    dict(name=k.name, hook=k.hook, required=k.required, when=k.when, why=k.why)
                    for k in contract.declared_class(self.cls, kind)
                ]
                if self.cls
                else []
                for kind in ("publishes", "reads")
            },
            "status": "broken" if self.error else "ok",
            "error": self.error,
        }


def hook_problems(cls: type) -> list[str]:
    """What is wrong with a class's ``regdefense_*`` methods, checked against the hook specs: a method without the
    ``@hookimpl`` marker (it would never run), a name that is no hook (with a suggestion), an argument the hook
    does not pass. Empty when every hook is fine."""
    specs = {n: getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("regdefense_")}
    problems = []
    for name in sorted(n for n in dir(cls) if n.startswith("regdefense_")):
        fn = getattr(cls, name)
        if name not in specs:
            problems.append(f"{name} is not a hook{did_you_mean(name, specs)}")
            continue
        marker = getattr(fn, "regdefense_impl", None)
        if marker is None:
            problems.append(f"{name} lacks the @hookimpl marker, so it would never be called")
            continue
        if (marker.get("wrapper") or marker.get("hookwrapper")) and not inspect.isgeneratorfunction(fn):
            problems.append(
                f"{name} is marked wrapper=True but never yields, so pluggy refuses it when a run starts (a wrapper "
                f"is `result = yield` then `return result`)"
            )
            continue
        passed = set(inspect.signature(specs[name]).parameters)
        try:
            taken = [p for p in inspect.signature(fn).parameters if p != "self"]
        except (TypeError, ValueError):
            continue
        extra = [p for p in taken if p not in passed]
        if extra:
            problems.append(
                f"{name} takes {', '.join(extra)}, which the hook does not pass (it passes {', '.join(sorted(passed))})"
            )
    return problems


def _check_defense_class(cls: Any, ep_name: str | None = None) -> str | None:
    if not isinstance(cls, type):
        return f"entry point does not name a class (got {type(cls).__name__})"
    config = getattr(cls, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return "defense class has no Config dataclass"
    if not any(n.startswith("regdefense_") for n in dir(cls)):
        return "defense class implements no regdefense_* hook"
    declared = getattr(cls, "name", None)
    if ep_name is not None and declared is not None and declared != ep_name:
        return (
            f"the entry point is named '{ep_name}' but the class says name = '{declared}'; users activate the "
            f"entry-point name, so make them the same"
        )
    problems = hook_problems(cls)
    return "; ".join(problems) if problems else None


def catalogue() -> dict[str, PluginInfo]:
    """All installed defenses by name. A defense that fails to import is listed with ``error`` set."""
    found: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=GROUP):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        info = PluginInfo(name=ep.name, value=ep.value, dist=dist, version=version)
        if ep.name in found and found[ep.name].dist != dist:
            info.error = f"name '{ep.name}' is also provided by {found[ep.name].dist}; uninstall one of them"
            found[ep.name] = info
            continue
        try:
            info.cls = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the listing
            info.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
        else:
            info.error = _check_defense_class(info.cls, ep.name)
        found[ep.name] = info
    return found


def get(name: str, cat: dict[str, PluginInfo] | None = None) -> PluginInfo:
    """The usable defense ``name``, or a PluginError saying why not."""
    cat = catalogue() if cat is None else cat
    if name not in cat:
        raise PluginError(unknown("defense", name, cat) + " (see `regdefense plugins`)")
    info = cat[name]
    if info.error:
        raise PluginError(f"defense '{name}' from {info.dist} {info.version} is broken: {info.error}")
    return info


def _cls(info: PluginInfo) -> Any:
    """The defense class of a usable catalogue entry (:func:`get` refused the others)."""
    assert info.cls is not None, info.error
    return info.cls


def config_classes(names: list[str]) -> dict[str, type]:
    """``{name: Config dataclass}`` for a stack of defense names (validated)."""
    cat = catalogue()
    return {name: _cls(get(name, cat)).Config for name in names}


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("regdefense")
    pm.add_hookspecs(hookspecs)
    return pm


def activate(
    stack: list[Any], configs: dict[str, Any] | None = None, warn: Callable[[str], None] | None = None
) -> pluggy.PluginManager:
    """Build a plugin manager with the stack plus ``core``.

    The stack is registered in the typed order except where the data contract
    (:mod:`regdefense.host.contract`) needs a writer called before a reader of the same hook.

    :param stack: defense names (looked up in the catalogue) or ready-made defense objects (with a
        ``name`` attribute; handy in tests and notebooks).
    :param configs: ``{name: Config instance}``; a missing entry gets the defaults.
    :param warn: receives contract warnings (a read with no writer, when not required); default:
        :class:`ContractWarning` through :mod:`warnings`.
    :raises PluginError: unknown or broken names, a name given twice, hooks that do not match
        the specs, two defenses providing the same exclusive hook, or a required contract key missing.
    """
    configs = configs or {}
    pm = new_manager()
    cat = None
    named: list[tuple[str, Any, str]] = []
    for item in stack:
        if isinstance(item, str):
            cat = catalogue() if cat is None else cat
            info = get(item, cat)
            name, origin = item, f"{info.dist} {info.version}"
            try:
                cls = _cls(info)
                plugin = cls(configs.get(item) or cls.Config())
            except Exception as exc:  # a third-party constructor may raise anything
                raise PluginError(
                    f"defense '{item}' ({origin}) could not be created: {type(exc).__name__}: {exc}"
                ) from None
        else:
            if isinstance(item, type):  # a class (a plugin under test, not installed): built with its defaults
                item = item(item.Config()) if hasattr(item, "Config") else item()
            plugin, name, origin = item, getattr(item, "name", type(item).__name__), "an object"
            problems = hook_problems(type(plugin))
            if problems:
                raise PluginError(f"defense '{name}' ({origin}): {'; '.join(problems)}")
        if any(n == name for n, _, _ in named) or name == "core":
            raise PluginError(
                f"defense '{name}' is in the stack twice; list each defense once"
                if name != "core"
                else "'core' is the loop's own plugin; it cannot be activated"
            )
        named.append((name, plugin, origin))
    # writers of step data are registered after their readers, so that pluggy (last registered, first called)
    # calls them first in a hook both act in, whatever order the stack was typed in
    origins = {name: origin for name, _, origin in named}
    for name, plugin in contract.order([(n, p) for n, p, _ in named]):
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"defense '{name}' ({origins[name]}) does not fit this regdefense: {exc}") from None
    # core last: pluggy places each new trylast impl first in line to be called last, so registering core
    # after the stack makes its defaults the very last resort, behind any defense's fallback provider
    pm.register(CorePlugin(), name="core")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"unknown hook: {exc}") from None
    check_conflicts(pm)
    answering = {
        hook: (providers(pm, hook) or providers(pm, hook, fallbacks=True) or ["core"])[0]
        for hook in hookspecs.EXCLUSIVE
    }
    contract.check(pm.list_name_plugin(), warn or _warn, answering, publishers_of)
    check_requires(pm)
    return pm


def publishers_of(key_name: str) -> list[str]:
    """The installed, usable defenses that declare they publish step data ``key_name``."""
    return [
        n
        for n, info in catalogue().items()
        if info.cls is not None
        and not info.error
        and any(k.name == key_name for k in contract.declared_class(info.cls, "publishes"))
    ]


def check_requires(pm: pluggy.PluginManager) -> None:
    """Refuse a stack in which a defense's ``requires`` (hook names, e.g. ``("make_adversarial",)``: a modifier of
    adversarial examples without an adversary adds nothing) has no provider besides ``core``."""
    for name, plugin in pm.list_name_plugin():
        for hook in declared(plugin, "requires") or ():
            full = hook if hook.startswith("regdefense_") else "regdefense_" + hook
            if not hasattr(hookspecs, full):
                raise PluginError(f"defense '{name}' requires '{hook}', which is not a hook")
            impls = getattr(pm.hook, full).get_hookimpls()
            if not any(i.plugin_name not in ("core", name) and not (i.wrapper or i.hookwrapper) for i in impls):
                have = sorted(
                    n
                    for n, info in catalogue().items()
                    if info.cls is not None and not info.error and callable(getattr(info.cls, full, None)) and n != name
                )
                raise PluginError(
                    f"defense '{name}' needs a defense that provides {full.removeprefix('regdefense_')}"
                    f" and none is active; add one of: {', '.join(have)}"
                )


def _warn(message: str) -> None:
    warnings.warn(message.removeprefix("warning: "), ContractWarning, stacklevel=3)


def call_order(pm: pluggy.PluginManager, hook: str) -> list[str]:
    """The names of the plain implementations of ``hook`` in the order pluggy calls them (``core`` aside)."""
    impls = getattr(pm.hook, hook).get_hookimpls()
    return [i.plugin_name for i in reversed(impls) if i.plugin_name != "core" and not (i.wrapper or i.hookwrapper)]


def providers(pm: pluggy.PluginManager, hook: str, fallbacks: bool = False) -> list[str]:
    """Names of the active plugins other than ``core`` that provide ``hook`` (wrappers excluded).

    A provider marked ``trylast=True`` is a *fallback*: it answers only when no regular provider does
    (DYNAT offers its dynamic-label PGD this way, so ``dynat + trades`` uses TRADES' adversary). With
    ``fallbacks=True`` the fallbacks are listed instead of the regular providers.
    """
    impls = getattr(pm.hook, hook).get_hookimpls()
    return [
        i.plugin_name
        for i in impls
        if i.plugin_name != "core" and not (i.wrapper or i.hookwrapper) and bool(i.trylast) == fallbacks
    ]


def answer_error(pm: pluggy.PluginManager, hook: str, problem: str) -> PluginError:
    """A hook's result is unusable: name the defenses that implement it (the one that answered is among them)."""
    impls = reversed(getattr(pm.hook, hook).get_hookimpls())  # wrappers too: one may have replaced the answer
    names = list(dict.fromkeys(i.plugin_name for i in impls if i.plugin_name != "core")) or ["core"]
    who = f"defense '{names[0]}'" if len(names) == 1 else "one of the defenses " + ", ".join(f"'{n}'" for n in names)
    return PluginError(f"{who} returned an unusable result from {hook}: {problem}")


def adversarial_problem(adv: Any, inputs: Any) -> str | None:
    """What is wrong with a ``regdefense_make_adversarial`` result for a batch of ``inputs``, or None: it must be a
    floating tensor of the inputs' image shape (or a dict of them, for defenses that train on several batches)."""
    import torch

    items = adv.items() if isinstance(adv, dict) else [("", adv)]
    for key, value in items:
        where = f"[{key!r}] " if key else ""
        if not isinstance(value, torch.Tensor):
            return f"{where}is a {type(value).__name__}, not a tensor of adversarial images"
        if value.shape[1:] != inputs.shape[1:] or value.dim() != inputs.dim():
            return f"{where}has shape {tuple(value.shape)}; the batch's images are {tuple(inputs.shape)}"
        if not value.is_floating_point():
            return f"{where}has dtype {value.dtype}; images are floating point in [0, 1]"
    return None


def loss_terms_problem(terms: Any) -> str | None:
    """What is wrong with a ``regdefense_compute_loss`` result, or None: a dict of named scalar tensors."""
    import torch

    if not isinstance(terms, dict):
        return f"a {type(terms).__name__}, not a dict of named loss terms"
    for name, value in terms.items():
        if not isinstance(value, torch.Tensor):
            return f"term '{name}' is a {type(value).__name__}, not a tensor"
        if value.numel() != 1:
            return f"term '{name}' has shape {tuple(value.shape)}; each term must be a scalar (reduce it, e.g. .mean())"
    return None


def check_conflicts(pm: pluggy.PluginManager) -> None:
    """Raise PluginError if two active defenses provide the same exclusive hook (or, with no regular
    provider, offer two fallbacks for it)."""
    for hook in hookspecs.EXCLUSIVE:
        names = providers(pm, hook) or providers(pm, hook, fallbacks=True)
        if len(names) > 1:
            both = " and ".join(f"'{n}'" for n in names)
            raise PluginError(f"{both} both provide {hook}; activate only one of them")


@dataclass
class Culprit:
    """The defense whose code raised an exception during a run."""

    name: str
    where: str  #: the hook (or method) in which it raised

    def error(self, exc: BaseException, last_good: str, traceback_at: str) -> PluginError:
        info = catalogue().get(self.name)
        origin = f" (from {info.dist} {info.version})" if info is not None and not info.builtin else ""
        text = first_line(exc) if str(exc).strip() else ""
        return PluginError(
            f"defense '{self.name}'{origin} failed in {self.where}: {type(exc).__name__}"
            f"{': ' + text if text else ''}; last good checkpoint: {last_good}. Fix or "
            f"deactivate it; the other defenses are unaffected (full traceback: {traceback_at})"
        )


def blame(pm: pluggy.PluginManager, exc: BaseException) -> Culprit | None:
    """The active defense whose own code is deepest in ``exc``'s traceback, or None if none is.

    Read from the frames' source files: a frame in the module that defines a registered plugin's class.
    The deepest such frame names the defense; the function it ran names where.
    """
    files: dict[str, str] = {}
    for name, plugin in pm.list_name_plugin():
        if name == "core":
            continue
        try:
            files[os.path.realpath(inspect.getfile(type(plugin)))] = name
        except (TypeError, OSError):
            continue
    found, hook = None, None
    tb = exc.__traceback__
    while tb is not None:
        path = os.path.realpath(tb.tb_frame.f_code.co_filename)
        if path in files:
            found = Culprit(files[path], tb.tb_frame.f_code.co_name)
            if found.where.startswith("regdefense_"):
                hook = found.where
        tb = tb.tb_next
    if found is not None and hook is not None and found.where != hook:
        found.where = f"{hook} (in {found.where})"  # the hook that was running, and the helper that raised
    return found
