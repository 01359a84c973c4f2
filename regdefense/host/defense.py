"""The base class of defenses: what a defense may declare, in one place, instead of attributes the loop probes for.

Every built-in defense derives from :class:`Defense`; third-party defenses may (``regdefense new-plugin`` does) or
may not — the loop reads a plain class's declarations through :func:`declared`, with this class's defaults. A
defense still *acts* only through ``@hookimpl`` methods (:mod:`regdefense.host.hookspecs`).

Attack budgets are declared once: a defense whose ``Config`` derives from :class:`Budget` (multi-step),
:class:`SingleStepBudget` (FGSM-like), :class:`StepBudget` or :class:`Radius` (ε alone) gets those fields with their
help and validation, and ``resolve`` turns them into what an attack call takes through the one ε rule
(:func:`resolve_eps`: the defense's ε, ramped, or the run's current ε) and the one step rule (:func:`step_size`:
``alpha_factor·ε/steps`` unless a step is given). A defense whose step means something else (DYNAT's, EATR's) uses
the two functions directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from regdefense.attacks.adapter import kl_pgd, pgd, step_size  # noqa: F401  (step_size: the one step rule, re-exported for defenses)
from regdefense.base.fields import option
from regdefense.host.contract import Key


class Defense:
    """A defense: a name, a ``Config`` dataclass, declared step data, optional state for resume.

    :cvar name: the entry-point name users activate.
    :cvar publishes: step data it writes (:class:`regdefense.host.contract.Key`), ordered by the host.
    :cvar reads: step data it reads.
    :cvar requires: hooks some *other* active defense must provide (``("make_adversarial",)``).
    :cvar single_step: its adversary takes one step (the catastrophic-overfitting guard watches such runs).
    :cvar norms: the threat norms it is defined for; the host refuses a run in another one, before anything is built
        (a signed-step method under ``threat.norm=l2`` would otherwise train L∞ perturbations without a word).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type("Config", (), {})
    publishes: ClassVar[tuple[Key, ...]] = ()
    reads: ClassVar[tuple[Key, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    single_step: ClassVar[bool] = False
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this defense so that a resumed run continues exactly (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (called after ``regdefense_fit_start``)."""

    def memory_needs(self, trainer: Any) -> dict[str, tuple[int, str]]:
        """Per-sample buffers it will hold, ``{label: (bytes, "device" | "host" | a place)}``, for ``train --check``."""
        return {}


#: the optional members a defense may declare, with what a class that declares none gets
MEMBERS = (
    "publishes",
    "reads",
    "requires",
    "single_step",
    "norms",
    "state_dict",
    "load_state_dict",
    "memory_needs",
)


def declared(plugin: Any, member: str) -> Any:
    """``plugin``'s declaration of ``member`` (one of :data:`MEMBERS`), or :class:`Defense`'s default when a plain
    class declares nothing. Methods come back bound; a missing method is None (nothing to call)."""
    if member not in MEMBERS:
        raise ValueError(f"{member!r} is not a declared defense member ({', '.join(MEMBERS)})")
    value = getattr(plugin, member, None)
    if value is not None:
        return value
    default = getattr(Defense, member)
    return None if callable(default) else default


def resolve_eps(trainer: Any, eps: float | None) -> float:
    """The one ε rule of every defense: its own ε, ramped by the run's warm-up (``trainer.ramp``), else the run's
    current ε (``trainer.eps``, already ramped)."""
    return trainer.ramp(eps) if eps is not None else trainer.eps


@dataclass
class Radius:
    """The budget block of a defense that needs only ε (a certified radius, a random point's radius)."""

    eps: float | None = option(None, "perturbation budget (none: the run's threat.eps)", ge=0)

    def resolve_eps(self, trainer: Any) -> float:
        return resolve_eps(trainer, self.eps)

    def resolved(self, trainer: Any) -> dict[str, Any]:
        """What ``train --check`` shows: the values an attack of this batch would take."""
        return {"eps": self.resolve_eps(trainer)}


@dataclass
class StepBudget(Radius):
    """ε and one step size: ``alpha``, else ``alpha_factor·ε/steps`` (single-step methods: ``steps`` is 1)."""

    alpha: float | None = option(None, "step size (none: alpha_factor·ε)", gt=0)

    #: the default step size is ``alpha_factor·ε/steps``, ``steps`` being 1 unless a subclass declares the field
    alpha_factor: ClassVar[float] = 1.0

    def resolve(self, trainer: Any) -> tuple[float, float]:
        """(ε, step size) for this batch."""
        eps = self.resolve_eps(trainer)
        return eps, step_size(eps, self.alpha, getattr(self, "steps", 1), self.alpha_factor)

    def resolved(self, trainer: Any) -> dict[str, Any]:
        eps, alpha = self.resolve(trainer)
        return {"eps": eps, "alpha": alpha, "steps": getattr(self, "steps", 1)}


@dataclass
class SingleStepBudget(StepBudget):
    """The budget block of single-step adversaries (FGSM and its relatives): ε, the step, the BN mode."""

    attack_mode: Literal["eval", "train"] = option("eval", "BN/dropout mode during the attack")

    @property
    def train_mode(self) -> bool:
        return self.attack_mode == "train"


@dataclass
class Budget:
    """The attack-budget block a defense's ``Config`` derives from (redeclare a field to change its default)."""

    eps: float | None = option(None, "perturbation budget (none: the run's threat.eps)", ge=0)
    alpha: float | None = option(None, "attack step size (none: 2.5·ε/steps)", gt=0)
    steps: int = option(10, "attack iterations", ge=1)
    norm: Literal["linf", "l2"] | None = option(None, "perturbation norm (none: the run's)")
    attack_mode: Literal["eval", "train"] = option("eval", "BN/dropout mode during the attack")

    #: the default step size is ``alpha_factor·ε/steps``
    alpha_factor: ClassVar[float] = 2.5

    def resolve(self, trainer: Any) -> tuple[float, float]:
        """(ε, step size) for this batch: the defense's own ε ramped by the warm-up, else the run's current ε."""
        eps = resolve_eps(trainer, self.eps)
        return eps, step_size(eps, self.alpha, self.steps, self.alpha_factor)

    def resolved(self, trainer: Any) -> dict[str, Any]:
        eps, alpha = self.resolve(trainer)
        return {"eps": eps, "alpha": alpha, "steps": self.steps, "norm": self.attack_norm(trainer)}

    def attack_norm(self, trainer: Any) -> str:
        return self.norm or trainer.norm

    @property
    def train_mode(self) -> bool:
        return self.attack_mode == "train"

    def pgd(self, trainer: Any, model: Any, step: Any, *, start: Any = "uniform", clip_start: bool = True) -> Any:
        """The adversary of this budget: PGD on ``step.inputs`` against ``step.targets`` (ε and step size from
        :meth:`resolve`, this norm and BN mode), under the run's attack precision, reporting per-sample counts in
        ``step.info``. ``start``: ``"uniform"``, None, or a tensor (TRADES' and MART's 0.001·N(0, I))."""
        eps, alpha = self.resolve(trainer)
        with trainer.attack_autocast():
            return pgd(
                model,
                step.inputs,
                step.targets,
                eps=eps,
                alpha=alpha,
                steps=self.steps,
                norm=self.attack_norm(trainer),
                start=start,
                train_mode=self.train_mode,
                info=step.info,
                clip_start=clip_start,
            )

    def kl_pgd(self, trainer: Any, model: Any, step: Any) -> Any:
        """TRADES' label-free KL inner maximisation within this budget (start x + 0.001·N(0, I)), under the run's
        attack precision; ``step.targets`` only label the per-sample counts in ``step.info``."""
        eps, alpha = self.resolve(trainer)
        with trainer.attack_autocast():
            return kl_pgd(
                model,
                step.inputs,
                eps=eps,
                alpha=alpha,
                steps=self.steps,
                norm=self.attack_norm(trainer),
                train_mode=self.train_mode,
                info=step.info,
                kappa_labels=step.targets,
            )


def budget_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(Budget)]
