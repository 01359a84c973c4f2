"""The data contract between defenses: what each publishes on a training step and what each reads.

Defenses hand each other data through the step: ``step.info["kappa"]``, ``step.outputs["init"]``, the
``step.weighters`` list. Whether a reader sees a writer's value used to depend on the order the user typed
the stack (pluggy calls the later-registered plugin first). Now each defense *declares* the keys::

    class FGSMPGK:
        publishes = (Key("info.acc_ratio", "batch_end"), Key("outputs.init", "make_adversarial"), ...)

    class EMA:
        reads = (Key("info.acc_ratio", "batch_end", required=True, when="adaptive_tau"),)

and :func:`order` decides the order of registration so that, in a hook both act in, every writer is called
before its readers, whatever order the stack was typed in. :func:`check` says what is missing: a reader
whose writer is absent, or a publisher nobody applies, is a :class:`PluginError` when ``required`` (a
setting would be silently ignored) and a warning otherwise. ``core`` publishes ``outputs.adv`` and applies
``weighters`` (its objective calls ``trainer.adv_mean``) unless another defense provides the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from regdefense.base.errors import PluginError

#: the per-batch hooks in the order the loop calls them (compute_loss runs inside forward_backward)
STEP_ORDER = (
    "regdefense_batch_start",
    "regdefense_make_adversarial",
    "regdefense_forward_backward",
    "regdefense_compute_loss",
    "regdefense_before_optimizer_step",
    "regdefense_batch_end",
)


@dataclass(frozen=True)
class Key:
    """A piece of step data a defense writes or reads, and the hook in which it does.

    :param name: ``"info.<key>"``, ``"outputs.<key>"``, ``"stash.<key>"`` or ``"weighters"``.
    :param hook: the hook (``"batch_end"`` or ``"regdefense_batch_end"``) where it is written or read.
    :param required: for a read, no active writer is an activation error (else a warning); for a
        publication, no active reader is an error (else nothing is said: publishing is free).
    :param why: the reason, shown in the message.
    :param silent: for a read, the key is used when present and nothing is lost without it (an objective
        applies whatever weighters there are; a cached logit is recomputed): no warning.
    :param when: the name of a config field: the key counts only when that field is set (not None, 0, "" or
        False), e.g. ``ema`` reads ``info.acc_ratio`` only ``when="adaptive_tau"``; ``"not FIELD"``: only
        when it is unset.
    """

    name: str
    hook: str
    required: bool = False
    why: str = ""
    when: str = ""
    silent: bool = False

    def __post_init__(self) -> None:
        hook = self.hook if self.hook.startswith("regdefense_") else "regdefense_" + self.hook
        if hook not in STEP_ORDER:
            raise ValueError(f"Key {self.name!r}: {self.hook!r} is not a per-batch hook ({', '.join(STEP_ORDER)})")
        object.__setattr__(self, "hook", hook)

    @property
    def stage(self) -> int:
        return STEP_ORDER.index(self.hook)

    def __str__(self) -> str:
        return f"{self.name} in {self.hook[len('regdefense_') :]}" + (
            f" (when {self.when} is set)" if self.when else ""
        )


def declared(plugin: Any, kind: str) -> tuple[Key, ...]:
    """The ``publishes`` or ``reads`` keys of an active plugin that its config switches on; none declared: ()."""
    keys = tuple(getattr(plugin, kind, ()) or ())
    for key in keys:
        if not isinstance(key, Key):
            raise PluginError(
                f"defense '{getattr(plugin, 'name', type(plugin).__name__)}': {kind} must hold "
                f"regdefense.host.contract.Key objects, got {key!r}"
            )
    config = getattr(plugin, "config", None)
    return tuple(k for k in keys if _enabled(k.when, config))


def _enabled(when: str, config: Any) -> bool:
    if not when:
        return True
    negate, field = when.startswith("not "), when.removeprefix("not ").strip()
    value = getattr(config, field, None)
    return (value in (None, 0, "", False)) if negate else (value not in (None, 0, "", False))


#: what :func:`regdefense.attacks.adapter.pgd` publishes when a defense hands it ``info=step.info``
PGD_INFO = ("info.kappa", "info.steps", "info.x_init")
#: the input gradient of the first step of :func:`regdefense.attacks.adapter.pgd` (GradAlign reads it)
PGD_GRAD = "info.grad_init"


def adversary(*names: str, when: str = "") -> tuple[Key, ...]:
    """Keys published by an adversary (in ``make_adversarial``)."""
    return tuple(Key(n, "make_adversarial", when=when) for n in names)


#: an objective that applies the registered per-sample weighters (through ``trainer.adv_mean``)
APPLIES_WEIGHTS = Key("weighters", "compute_loss", silent=True)


def _same_hook_plain(plugin: Any, hook: str) -> bool:
    """Whether ``plugin`` implements ``hook`` as a plain (non-wrapper) implementation: then call order matters."""
    fn = getattr(plugin, hook, None)
    opts = getattr(fn, "regdefense_impl", None) or {}
    return fn is not None and not (opts.get("wrapper") or opts.get("hookwrapper"))


def order(named: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The registration order: the typed order, moved only where a hook has a writer and a reader of a key.

    pluggy calls plain implementations of a hook last-registered first, so a reader is registered before
    its writer. Stable: defenses without such a pair keep their typed order. Raises PluginError on a cycle.
    """
    before: dict[str, set[str]] = {n: set() for n, _ in named}  # name -> names that must be registered first
    for wname, writer in named:
        for w in declared(writer, "publishes"):
            for rname, reader in named:
                if rname == wname:
                    continue
                for r in declared(reader, "reads"):
                    if (
                        r.name == w.name
                        and r.hook == w.hook
                        and _same_hook_plain(writer, w.hook)
                        and _same_hook_plain(reader, r.hook)
                    ):
                        before[wname].add(rname)
    out: list[tuple[str, Any]] = []
    left = list(named)
    while left:
        ready = next((item for item in left if before[item[0]] <= {n for n, _ in out}), None)
        if ready is None:
            names = " and ".join(f"'{n}'" for n, _ in left)
            raise PluginError(
                f"defenses {names} each read what another writes in the same hook; no order of calls satisfies them all"
            )
        out.append(ready)
        left.remove(ready)
    return out


def effective(name: str, plugin: Any, kind: str, answering: dict[str, str]) -> tuple[Key, ...]:
    """The keys a plugin really writes or reads in this stack: a plain implementation of an exclusive hook
    counts only if it is the one that answers (a fallback adversary that another provider overrides
    publishes nothing)."""
    return tuple(
        k
        for k in declared(plugin, kind)
        if k.hook not in answering or answering[k.hook] == name or not _same_hook_plain(plugin, k.hook)
    )


def check(
    named: list[tuple[str, Any]],
    warn: Callable[[str], None],
    answering: dict[str, str],
    publishers: Callable[[str], list[str]] | None = None,
) -> None:
    """Refuse (or warn about) reads without a writer, reads of keys written only later in the step, and
    required publications that nothing active applies.

    :param named: the active plugins, ``core`` included.
    :param answering: for each exclusive hook, the name of the plugin whose plain implementation answers.
    :param publishers: the installed defenses that publish a key (for the "add one of" hint), if known.
    """
    writers: dict[str, list[tuple[str, Key]]] = {}
    readers: dict[str, list[tuple[str, Key]]] = {}
    for name, plugin in named:
        for key in effective(name, plugin, "publishes", answering):
            writers.setdefault(key.name, []).append((name, key))
        for key in effective(name, plugin, "reads", answering):
            readers.setdefault(key.name, []).append((name, key))
    for key_name, reads in readers.items():
        for rname, r in reads:
            ws = [(n, w) for n, w in writers.get(key_name, []) if n != rname]
            if not ws and not r.silent:
                _say(
                    r.required,
                    warn,
                    f"defense '{rname}' reads {r.name} but no active defense publishes it"
                    f"{_hint(key_name, named, publishers)}{'; ' + r.why if r.why else ''}",
                )
            elif ws and all(w.stage > r.stage for _, w in ws):
                who = ", ".join(f"'{n}' ({w.hook})" for n, w in ws)
                _say(
                    r.required,
                    warn,
                    f"defense '{rname}' reads {r.name} in {r.hook}, but it is written only later in the step by {who}",
                )
    for key_name, pubs in writers.items():
        for wname, w in pubs:
            if w.required and not [n for n, _ in readers.get(key_name, []) if n != wname]:
                _say(
                    True,
                    warn,
                    f"defense '{wname}' publishes {w.name} but no active defense applies it"
                    f"{'; ' + w.why if w.why else ''}",
                )


def _say(required: bool, warn: Callable[[str], None], message: str) -> None:
    if required:
        raise PluginError(message)
    warn("warning: " + message)


def _hint(key_name: str, named: Iterable[tuple[str, Any]], publishers: Callable[[str], list[str]] | None) -> str:
    """Which installed defenses publish ``key_name``, to suggest adding one."""
    try:
        names = sorted(publishers(key_name)) if publishers is not None else []
    except Exception:  # a hint must never break activation
        names = []
    active = {n for n, _ in named}
    names = [n for n in names if n not in active]
    return f" (add one of: {', '.join(names)})" if names else ""


def declared_class(cls: type, kind: str) -> tuple[Key, ...]:
    """Every key a defense class declares (whatever its config), for listings."""
    return tuple(k for k in (getattr(cls, kind, ()) or ()) if isinstance(k, Key))
