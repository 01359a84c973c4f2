"""Named attack suites, built from library attacks through the adapter.

Each suite is a list of :class:`SuiteAttack` (a label and a spec string). An attack without a
``group`` attacks every point and reports its own accuracy; attacks that share a ``group`` (the
AutoAttack protocols) run in order, each only on the points still robust, and the group reports the
per-point worst case, as the official AutoAttack does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from regdefense.attacks.adapter import attack_kind, parse_spec, pgd_spec, step_size
from regdefense.base.errors import ConfigError
from regdefense.base.registry import Registry

#: settings of the official AutoAttack "standard" version (Croce & Hein 2020, package `autoattack`),
#: against which the `autoattack` suite is checked by the tests
OFFICIAL_STANDARD: dict[str, dict[str, Any]] = {
    "apgd-ce": {"steps": 100, "n_restarts": 1, "loss": "ce", "rho": 0.75, "eot_iter": 1},
    "apgd-t": {"steps": 100, "n_restarts": 1, "n_target_classes": 9, "rho": 0.75, "eot_iter": 1},
    "fab-t": {"steps": 100, "n_restarts": 1, "n_target_classes": 9, "multi_targeted": True},
    "square": {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8, "resc_schedule": False},
}
#: the official "rand" version for randomized defenses: APGD-CE and APGD-DLR with 20 EOT samples
OFFICIAL_RAND = {
    "apgd-ce": {"steps": 100, "n_restarts": 1, "loss": "ce", "eot_iter": 20},
    "apgd-dlr": {"steps": 100, "n_restarts": 1, "loss": "dlr", "eot_iter": 20},
}


@dataclass
class SuiteAttack:
    label: str
    spec: str
    black_box: bool = False
    eot: bool = False
    single_step: bool = False
    #: its examples are projected onto the ε-ball when they leave it (False: an unbounded attack a protocol reports
    #: as such, e.g. paper-001's C&W: counted and said, not moved)
    bounded: bool = True
    group: str | None = None
    surrogate: str | None = None  #: "bpda": run the attack on ``model.bpda_model`` and measure the real model


@dataclass
class Suite:
    name: str
    attacks: list[SuiteAttack]
    protocol: str = ""
    eps: float = 0.0
    norm: str = "linf"
    notes: list[str] = field(default_factory=list)


def _n(norm: str) -> str:
    return "Linf" if norm == "linf" else "L2"


def official_autoattack(
    eps: float, norm: str, num_classes: int, seed: int, version: str = "standard"
) -> list[SuiteAttack]:
    """The official AutoAttack (package ``pyautoattack``, Croce & Hein), one attack at a time with its ``version``'s
    settings, so the cascade keeps per-attack rows; each attack runs only on the points still robust."""
    n = _n(norm)
    k = f", n_classes={num_classes}" if num_classes < 10 else ""
    if version == "rand":
        return [
            SuiteAttack(
                label,
                f"autoattack:{name}(eps={eps!r}, norm='{n}', version='rand', seed={seed}{k})",
                eot=True,
                group="AutoAttack-rand",
            )
            for label, name in (("APGD-CE (EOT-20)", "apgd_ce"), ("APGD-DLR (EOT-20)", "apgd_dlr"))
        ]
    return [
        SuiteAttack(
            label,
            f"autoattack:{name}(eps={eps!r}, norm='{n}', version='standard', seed={seed}{k})",
            black_box=name == "square",
            group="AutoAttack",
        )
        for label, name in (("APGD-CE", "apgd_ce"), ("APGD-T", "apgd_t"), ("FAB-T", "fab_t"), ("Square", "square"))
    ]


def autoattack(eps: float, norm: str, num_classes: int, seed: int) -> list[SuiteAttack]:
    """The standard AutoAttack assembled from torchattacks' components with the official settings (suite
    ``autoattack-ta``, kept to compare with the official code).

    torchattacks' APGDT and FAB attack ``n_classes - 1`` target classes, so ``n_classes = min(K, 10)``
    gives the official 9 targets (fewer when the dataset has fewer than 10 classes).
    """
    n, k = _n(norm), min(num_classes, 10)
    a, t, f, s = (OFFICIAL_STANDARD[x] for x in ("apgd-ce", "apgd-t", "fab-t", "square"))
    g = "AutoAttack"
    return [
        SuiteAttack(
            "APGD-CE",
            f"torchattacks:APGD(norm='{n}', eps={eps!r}, steps={a['steps']}, "
            f"n_restarts={a['n_restarts']}, loss='ce', rho={a['rho']}, seed={seed})",
            group=g,
        ),
        SuiteAttack(
            "APGD-T",
            f"torchattacks:APGDT(norm='{n}', eps={eps!r}, steps={t['steps']}, "
            f"n_restarts={t['n_restarts']}, n_classes={k}, rho={t['rho']}, seed={seed})",
            group=g,
        ),
        SuiteAttack(
            "FAB-T",
            f"torchattacks:FAB(norm='{n}', eps={eps!r}, steps={f['steps']}, "
            f"n_restarts={f['n_restarts']}, multi_targeted=True, n_classes={k}, seed={seed})",
            group=g,
        ),
        SuiteAttack(
            "Square",
            f"torchattacks:Square(norm='{n}', eps={eps!r}, n_queries={s['n_queries']}, "
            f"n_restarts={s['n_restarts']}, p_init={s['p_init']}, loss='margin', "
            f"resc_schedule=False, seed={seed})",
            black_box=True,
            group=g,
        ),
    ]


@dataclass(frozen=True)
class SuiteRequest:
    """What a suite is built for: ``eps`` (the evaluation's ε, the target's default when none was asked), the ε the
    user asked for (``requested_eps``, None when none), the norm, the number of classes and the seed."""

    eps: float
    requested_eps: float | None
    norm: str
    num_classes: int
    seed: int = 0


SuiteBuilder = Callable[[SuiteRequest], Suite]
#: third parties register suites under this entry-point group: ``name = "package.module:builder"``, where the builder
#: takes a :class:`SuiteRequest` and returns a :class:`Suite`
GROUP = "regdefense.suites"
#: every suite builder by name: the built-in ones, then those of the group (one that fails to load is left out, warned)
SUITES: Registry[SuiteBuilder] = Registry(
    "attack suite", GROUP, error=ConfigError, hint=", or an attack spec such as torchattacks:PGD(eps=0.1)"
)


def register_suite(name: str) -> Callable[[SuiteBuilder], SuiteBuilder]:
    """Register a suite builder under ``name`` (as ``register_model`` does for architectures)."""
    return SUITES.decorator(name)


def registry() -> dict[str, SuiteBuilder]:
    """Every suite by name: the built-in ones, then those installed through the ``regdefense.suites`` group (a
    third-party suite that fails to load is left out, with a warning)."""
    return SUITES.all()


def build_suite(
    name: str, *, eps: float | None, default_eps: float, norm: str, num_classes: int, seed: int = 0
) -> Suite:
    """A named suite, or a single attack given as a spec (``torchattacks:...`` / ``art:...``)."""
    if ":" in name:
        spec = parse_spec(name)
        kind = attack_kind(spec)
        return Suite(
            name=name,
            attacks=[SuiteAttack(spec.name, name, black_box=kind.black_box)],
            protocol=f"one attack: {name}",
            eps=eps if eps is not None else spec.kwargs.get("eps", default_eps),  # an asked-for ε is the threat model
            norm=kind.norm or norm,
        )
    builder = SUITES.get(name)
    e = eps if eps is not None else default_eps
    return builder(SuiteRequest(eps=e, requested_eps=eps, norm=norm, num_classes=num_classes, seed=seed))


# --- the built-in suites ------------------------------------------------------------------------


@register_suite("quick")
def _suite_quick(r: SuiteRequest) -> Suite:
    e, norm = r.eps, r.norm
    single = (
        f"torchattacks:FGSM(eps={e!r})"
        if norm == "linf"
        else f"torchattacks:PGDL2(eps={e!r}, alpha={e!r}, steps=1, random_start=False)"
    )
    return Suite(
        "quick",
        [
            SuiteAttack("FGSM" if norm == "linf" else "FGM", single, single_step=True),
            SuiteAttack("PGD-20", pgd_spec(norm, e, 20)),
        ],
        protocol="independent attacks: FGSM and PGD-20 (step 2.5·ε/20, random start)",
        eps=e,
        norm=norm,
    )


@register_suite("paper-001")
def _suite_paper_001(r: SuiteRequest) -> Suite:
    eps, norm = r.requested_eps, r.norm
    if norm != "linf":
        raise ConfigError("suite paper-001 is L∞ only; use threat.norm=linf or another suite")
    e = eps if eps is not None else 0.1
    a = 2 / 255
    return Suite(
        "paper-001",
        [
            SuiteAttack("FGSM", f"torchattacks:FGSM(eps={e!r})", single_step=True),
            SuiteAttack("BIM", f"torchattacks:BIM(eps={e!r}, alpha={a!r}, steps=10)"),
            SuiteAttack("PGD-100", f"torchattacks:PGD(eps={e!r}, alpha={a!r}, steps=100, random_start=True)"),
            SuiteAttack("C&W", "torchattacks:CW(c=1.0, kappa=0, steps=100, lr=0.001)", bounded=False),
        ],
        protocol="seed 001 §5.2: FGSM, BIM (α=2/255, 10 steps), PGD (α=2/255, 100 steps) at ε "
        f"{e:.4g}; C&W-L2 (c=1, 100 steps, lr 0.001, unbounded)",
        eps=e,
        norm=norm,
        notes=[
            "C&W is an unbounded L2 attack: it returns the clean image where it fails; its accuracy is not "
            "an ε-ball number."
        ],
    )


@register_suite("paper-002")
def _suite_paper_002(r: SuiteRequest) -> Suite:
    e, norm, num_classes, seed = r.eps, r.norm, r.num_classes, r.seed
    if norm != "linf":
        raise ConfigError("suite paper-002 is L∞ only; use threat.norm=linf or another suite")
    a = e / 4  # 2/255 at ε = 8/255, as in the DYNAT evaluation
    attacks = [SuiteAttack(f"PGD-{k}", pgd_spec(norm, e, k, a)) for k in (10, 20, 50, 100)]
    attacks.append(
        SuiteAttack(
            "CW-Linf-20",
            f"torchattacks:UPGD(eps={e!r}, alpha={a!r}, steps=20, random_start=True, loss='margin', decay=0.0)",
        )
    )
    attacks.append(
        SuiteAttack(
            "APGD",
            f"torchattacks:APGD(norm='Linf', eps={e!r}, steps=100, n_restarts=1, loss='ce', rho=0.75, seed={seed})",
        )
    )
    attacks += official_autoattack(e, norm, num_classes, seed)
    return Suite(
        "paper-002",
        attacks,
        protocol="seed 002's columns: PGD-10/20/50/100 and C&W-L∞ (margin loss with "
        "the true class masked, 20 steps), step ε/4, random start; APGD-CE "
        "(100 steps) on its own; and AutoAttack standard (official code)",
        eps=e,
        norm=norm,
    )


@register_suite("autoattack")
def _suite_autoattack(r: SuiteRequest) -> Suite:
    e, norm, num_classes, seed = r.eps, r.norm, r.num_classes, r.seed
    return Suite(
        "autoattack",
        official_autoattack(e, norm, num_classes, seed),
        eps=e,
        norm=norm,
        protocol="AutoAttack standard, the official code (pyautoattack): APGD-CE, APGD-T, FAB-T, Square, "
        "each on the points still robust; per-point worst case",
    )


@register_suite("autoattack-ta")
def _suite_autoattack_ta(r: SuiteRequest) -> Suite:
    e, norm, num_classes, seed = r.eps, r.norm, r.num_classes, r.seed
    return Suite(
        "autoattack-ta",
        autoattack(e, norm, num_classes, seed),
        eps=e,
        norm=norm,
        protocol="AutoAttack standard (official settings: APGD-CE 100 it; APGD-T DLR 9 targets 100 it; "
        "FAB-T 9 targets 100 it; Square 5000 queries; each on still-robust points; per-point "
        "worst case), torchattacks components",
    )


@register_suite("autoattack-rand")
def _suite_autoattack_rand(r: SuiteRequest) -> Suite:
    e, norm, num_classes, seed = r.eps, r.norm, r.num_classes, r.seed
    return Suite(
        "autoattack-rand",
        official_autoattack(e, norm, num_classes, seed, "rand"),
        eps=e,
        norm=norm,
        protocol="AutoAttack rand, the official code (pyautoattack): APGD-CE and APGD-DLR with 20 EOT "
        "samples, still-robust points, per-point worst case",
    )


@register_suite("autoattack-rand-ta")
def _suite_autoattack_rand_ta(r: SuiteRequest) -> Suite:
    e, norm, seed = r.eps, r.norm, r.seed
    n = _n(norm)
    return Suite(
        "autoattack-rand-ta",
        [
            SuiteAttack(
                "APGD-CE (EOT-20)",
                f"torchattacks:APGD(norm='{n}', eps={e!r}, steps=100, n_restarts=1, "
                f"loss='ce', eot_iter=20, seed={seed})",
                eot=True,
                group="AutoAttack-rand",
            ),
            SuiteAttack(
                "APGD-DLR (EOT-20)",
                f"torchattacks:APGD(norm='{n}', eps={e!r}, steps=100, n_restarts=1, "
                f"loss='dlr', eot_iter=20, seed={seed})",
                eot=True,
                group="AutoAttack-rand",
            ),
        ],
        eps=e,
        norm=norm,
        protocol="AutoAttack rand (official settings for randomized defenses: APGD-CE and APGD-DLR, 100 it, "
        "20 EOT samples; still-robust points; per-point worst case)",
    )


@register_suite("eot-pgd")
def _suite_eot_pgd(r: SuiteRequest) -> Suite:
    e, norm = r.eps, r.norm
    steps, eot = 20, 20
    return Suite(
        "eot-pgd",
        [
            SuiteAttack(
                f"PGD-{steps} EOT-{eot}",
                f"torchattacks:EOTPGD(eps={e!r}, "
                f"alpha={step_size(e, None, steps)!r}, steps={steps}, eot_iter={eot}, random_start=True)",
                eot=True,
            )
        ],
        eps=e,
        norm=norm,
        protocol=f"full-gradient PGD-{steps} with EOT over {eot} samples of the model's randomness, "
        f"through the whole model (adaptive)",
    )


@register_suite("bpda-pgd")
def _suite_bpda_pgd(r: SuiteRequest) -> Suite:
    e, norm = r.eps, r.norm
    return Suite(
        "bpda-pgd",
        [SuiteAttack("BPDA-PGD-20", pgd_spec(norm, e, 20), surrogate="bpda")],
        eps=e,
        norm=norm,
        protocol="PGD-20 with the purifier's gradient replaced by the identity (BPDA); the purified "
        "model is then measured on the result — a weaker, non-adaptive-in-gradient protocol",
    )


#: the built-in suites' names
BUILTIN = tuple(SUITES.builtin())  #: the built-in suites' names
