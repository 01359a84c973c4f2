"""One door to every attack: library attacks by spec string, and our shared inner maximisation.

A spec names a library and an attack class with keyword arguments::

    torchattacks:PGD(eps=8/255, alpha=2/255, steps=10)
    art:ProjectedGradientDescent(eps=0.3, eps_step=0.01, max_iter=40)
    autoattack:apgd_t(eps=8/255, version='standard', seed=0)     # one attack of the official AutoAttack

:func:`resolve_attack` turns it into a callable ``attack(model, x, y) -> x_adv`` with x and x_adv
in [0,1]. The adapter owns model-mode discipline (eval during the attack unless asked otherwise,
the previous mode restored after) and device placement.

:func:`pgd` is the projected-gradient maximiser that defenses with a non-standard inner objective
(TRADES' KL, dynamic labels, prior-guided starts) share, instead of writing their own loop.
"""

from __future__ import annotations

import ast
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regdefense.base.errors import ConfigError, unknown
from regdefense.base.fields import safe_eval

LIBRARIES = ("torchattacks", "art", "autoattack")

#: the official AutoAttack's attacks (package ``pyautoattack``), by spec name (underscores for its hyphens)
AUTOATTACK_NAMES = ("apgd_ce", "apgd_dlr", "apgd_t", "fab", "fab_t", "square")


@contextmanager
def keep_modes(*nets: nn.Module) -> Iterator[None]:
    """Restore the train/eval mode of every submodule of ``nets`` after the block, whatever it switched."""
    before = [(m, m.training) for net in nets for m in net.modules()]
    try:
        yield
    finally:
        for m, mode in before:
            m.training = mode


@contextmanager
def model_mode(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train or eval mode for a block and restore every submodule's mode after."""
    with keep_modes(model):
        model.train(train)
        yield model


# --- the shared inner maximisation ------------------------------------------------------------


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def project(delta: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``delta`` onto the ε-ball of ``norm`` and keep ``x + delta`` in [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.dim() - 1))
        delta = delta * (eps / n).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def random_start(x: Tensor, eps: float, norm: str) -> Tensor:
    """A uniform draw in the L∞ ball, or a uniform-radius random direction in the L2 ball."""
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    d = torch.randn_like(x)
    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    r = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).view(-1, *[1] * (x.dim() - 1))
    return d * r * eps


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Any = None,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    loss_fn: Callable[[Tensor, Any], Tensor] | None = None,
    start: Tensor | str | None = "uniform",
    train_mode: bool = False,
    info: dict | None = None,
    kappa_labels: Tensor | None = None,
    clip_start: bool = True,
) -> Tensor:
    """Maximise ``loss_fn(model(x + δ), y)`` over ``‖δ‖ ≤ eps`` with ``x + δ`` in [0,1].

    :param loss_fn: summed over the batch, so each sample's step does not depend on the batch size
        (default: cross-entropy against ``y``). TRADES passes a KL to the clean prediction.
    :param start: ``"uniform"`` (random start in the ball), ``None`` (start at x), or a tensor δ0.
    :param clip_start: project a tensor δ0 onto the ball and [0, 1] before the first forward; ``False`` for the
        tiny ``0.001·N(0, I)`` starts of TRADES, MAIL and DYNAT, whose reference code does not clip the start.
    :param train_mode: run the model in train mode during the attack (BN batch statistics).
    :param info: if given, receives ``info["kappa"]``: per sample, the number of iterations at whose
        start the iterate was still classified as ``kappa_labels`` (default ``y``) — GAIRAT's geometry
        value, counted from the attack's own forwards at no extra cost —, ``info["x_init"]``, the
        starting point of the ascent, and ``info["grad_init"]``, the input gradient of its first step.
    :return: the adversarial inputs, detached. Parameter gradients are left untouched.
    """
    if norm not in ("linf", "l2"):
        raise ConfigError(f"norm must be 'linf' or 'l2', got {norm!r}")
    loss_fn = loss_fn or _ce_sum
    x = x.detach()
    if isinstance(start, Tensor):
        delta = project(start.detach().clone(), x, eps, norm) if clip_start else start.detach().clone()
    elif start == "uniform":
        delta = project(random_start(x, eps, norm), x, eps, norm)
    else:
        delta = torch.zeros_like(x)
    if info is not None:
        info["x_init"] = (x + delta).detach()  # where the ascent started (RegMix's δ_initial)
    kappa_labels = kappa_labels if kappa_labels is not None else y
    kappa = torch.zeros(len(x), dtype=torch.long, device=x.device) if info is not None else None
    with model_mode(model, train_mode), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            if kappa is not None:
                kappa += (logits.detach().argmax(1) == kappa_labels).long()
            loss = loss_fn(logits.float(), y)  # the attack's loss in fp32 even under autocast
            (grad,) = torch.autograd.grad(loss, delta)
            if info is not None and "grad_init" not in info:
                info["grad_init"] = grad.detach()  # the first step's input gradient (GradAlign aligns it)
            with torch.no_grad():
                if norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
                delta = project(delta.detach() + alpha * step, x, eps, norm)
    if info is not None:
        info["kappa"], info["steps"] = kappa, steps
    return (x + delta).detach()


def early_stopped_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    tau: int,
    omega: float = 0.0,
    random_init: bool = True,
    info: dict | None = None,
) -> Tensor:
    """FAT's inner maximisation (Zhang et al., ICML 2020): L∞ PGD on CE that stops, per point, ``tau`` steps after
    the point is first misclassified (PGD-K-τ), with Gaussian noise ``omega·N(0, I)`` added to each step.

    Each iteration first classifies every point still moving: a misclassified point with no steps left is
    frozen where it is; a misclassified point with steps left uses one; the rest take a step. Points never
    frozen end at their K-th iterate. ``info["kappa"]`` counts the iterations at whose start a point was
    still classified correctly (GAIR-FAT's geometry value). The model is in eval mode throughout.
    """
    x = x.detach()
    delta = project(random_start(x, eps, "linf") if random_init else torch.zeros_like(x), x, eps, "linf")
    if info is not None:
        info["x_init"] = (x + delta).detach()
    left = torch.full((len(x),), tau, dtype=torch.long, device=x.device)
    moving = torch.ones(len(x), dtype=torch.bool, device=x.device)
    kappa = torch.zeros(len(x), dtype=torch.long, device=x.device)
    with model_mode(model, False), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            wrong = logits.detach().argmax(1) != y
            kappa += (moving & ~wrong).long()
            stop = moving & wrong & (left == 0)
            left = torch.where(moving & wrong & (left > 0), left - 1, left)
            moving = moving & ~stop
            if not moving.any():
                break
            loss = F.cross_entropy(logits.float(), y, reduction="none")[moving].sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                step = alpha * grad.sign() + omega * torch.randn_like(x)
                moved = project(delta.detach() + step, x, eps, "linf")
                delta = torch.where(moving.view(-1, *[1] * (x.dim() - 1)), moved, delta.detach())
    if info is not None:
        info["kappa"], info["steps"] = kappa, steps
    return (x + delta).detach()


def kl_pgd(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    train_mode: bool = False,
    info: dict | None = None,
    kappa_labels: Tensor | None = None,
) -> Tensor:
    """TRADES' inner maximisation: maximise KL(p(x) ‖ p(x')) from x + 0.001·N(0, I), label-free.

    The clean distribution is computed once (in the attack's mode) and held fixed, as in TRADES'
    reference code. Shared by ``trades``, ``lbgat`` and any defense that needs the KL adversary.
    """
    with torch.no_grad(), model_mode(model, train_mode):
        p_clean = F.softmax(model(x), dim=1)

    def kl_sum(logits: Tensor, _y: Any) -> Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

    start = 0.001 * torch.randn_like(x)
    return pgd(
        model,
        x,
        None,
        eps=eps,
        alpha=alpha,
        steps=steps,
        norm=norm,
        loss_fn=kl_sum,
        start=start,
        train_mode=train_mode,
        info=info,
        kappa_labels=kappa_labels,
        clip_start=False,
    )


# --- library attacks by spec ------------------------------------------------------------------


@dataclass(frozen=True)
class AttackSpec:
    library: str
    name: str
    kwargs: dict[str, Any]

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.library}:{self.name}({args})"


#: torchattacks' attacks that use no gradient of the model (score- or decision-based)
TORCHATTACKS_BLACK_BOX = ("Square", "OnePixel", "Pixle", "SPSA")


@dataclass(frozen=True)
class AttackKind:
    """What an attack spec is, for the report: gradient-free (``black_box``: score- or decision-based, from ART's
    declared estimator requirements or torchattacks' known black-box attacks) and the norm its budget is in."""

    black_box: bool
    norm: str | None  #: "linf", "l2", or None when the spec does not say


def attack_kind(spec: AttackSpec) -> AttackKind:
    norm_arg = spec.kwargs.get("norm")
    norm = None
    if norm_arg is not None:
        text = str(norm_arg).lower()
        norm = "l2" if text in ("l2", "2") else "linf" if text in ("linf", "inf", "np.inf") else None
    elif spec.name.endswith("L2") or spec.name in ("CW", "CarliniL2Method", "DeepFool"):
        norm = "l2"
    black_box = spec.name in TORCHATTACKS_BLACK_BOX if spec.library == "torchattacks" else spec.name == "square"
    if spec.library == "art":
        import art.attacks.evasion as ev

        cls = getattr(ev, spec.name, None)
        reqs: list[Any] = []
        for r in getattr(cls, "_estimator_requirements", ()) or ():
            reqs += list(r) if isinstance(r, tuple) else [r]
        black_box = not any(getattr(r, "__name__", "") in ("LossGradientsMixin", "ClassGradientsMixin") for r in reqs)
    return AttackKind(black_box=black_box, norm=norm)


def parse_spec(spec: str) -> AttackSpec:
    """``"torchattacks:PGD(eps=8/255, steps=10)"`` → AttackSpec; syntax errors raise ConfigError."""
    library, sep, rest = spec.strip().partition(":")
    if not sep:
        raise ConfigError(
            f"attack spec '{spec}' must start with a library: {', '.join(lib + ':Name(...)' for lib in LIBRARIES)}"
        )
    if library not in LIBRARIES:
        raise ConfigError(unknown("attack library", library, LIBRARIES) + f" (in '{spec}')")
    try:
        node = ast.parse(rest.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(f"attack spec '{spec}' is not Name(key=value, ...)") from None
    if isinstance(node, ast.Name):
        return AttackSpec(library, node.id, {})
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise ConfigError(f"attack spec '{spec}' must look like Name(key=value, ...) with keyword arguments only")
    kwargs = {}
    for kw in node.keywords:
        try:
            kwargs[kw.arg] = safe_eval(kw.value)
        except (ValueError, ZeroDivisionError, TypeError):
            raise ConfigError(
                f"attack spec '{spec}': value of {kw.arg} must be a literal "
                f"(number, string, bool, list), got {ast.unparse(kw.value)}"
            ) from None
    return AttackSpec(library, node.func.id, {str(k): v for k, v in kwargs.items()})


def _check_common(spec: AttackSpec) -> None:
    for key in ("eps", "alpha", "eps_step"):
        value = spec.kwargs.get(key)
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"attack {spec}: {key} must be >= 0, got {value}")
    steps = spec.kwargs.get("steps", spec.kwargs.get("max_iter"))
    if isinstance(steps, int) and steps < 0:
        raise ConfigError(f"attack {spec}: the number of steps must be >= 0, got {steps}")


def _check_kwargs(spec: AttackSpec, cls: type, skip: tuple[str, ...]) -> None:
    params = inspect.signature(getattr(cls, "__init__")).parameters  # the class as written, self included
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in ("self",) + skip and params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in spec.kwargs:
        if key not in valid:
            raise ConfigError(f"attack {spec.library}:{spec.name} has no argument '{key}'; valid: {', '.join(valid)}")


def step_size(eps: float, alpha: float | None, steps: int, factor: float = 2.5) -> float:
    """The one step rule of the library: the declared step, else ``factor·ε/steps`` (2.5·ε/steps, Madry et al.'s for
    PGD; single-step methods name their own factor). Defenses reach it through :mod:`regdefense.host.defense`."""
    return alpha if alpha is not None else factor * eps / steps


def pgd_spec(norm: str, eps: float, steps: int, alpha: float | None = None) -> str:
    """torchattacks' PGD (L∞) or PGDL2 with a random start, step ``alpha`` (default 2.5·ε/steps), as a spec string:
    the one PGD of the final table, the suites and the sanity checks."""
    alpha = step_size(eps, alpha, steps)
    name = "PGD" if norm == "linf" else "PGDL2"
    return f"torchattacks:{name}(eps={eps!r}, alpha={alpha!r}, steps={steps}, random_start=True)"


def torchattacks_names() -> list[str]:
    import torchattacks

    base = torchattacks.attack.Attack
    return sorted(
        n
        for n, c in vars(torchattacks).items()
        if isinstance(c, type) and issubclass(c, base) and c is not base and n not in ("MultiAttack",)
    )


def art_names() -> list[str]:
    import art.attacks.evasion as ev
    from art.attacks.attack import EvasionAttack

    return sorted(n for n, c in vars(ev).items() if isinstance(c, type) and issubclass(c, EvasionAttack))


class _Float32(nn.Module):
    """Some ART attacks (HopSkipJump) hand the estimator float64 arrays; the model wants float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.float())


class LibraryAttack:
    """A resolved spec: ``attack(model, x, y) -> x_adv``; library objects are built once per model."""

    def __init__(self, spec: AttackSpec, cls: type, train_mode: bool = False) -> None:
        self.spec, self.cls, self.train_mode = spec, cls, train_mode
        self._model: nn.Module | None = None
        self._obj: Any = None

    def __repr__(self) -> str:
        return f"LibraryAttack({self.spec})"

    def _build(self, model: nn.Module, x: Tensor) -> Any:
        if self.spec.library == "autoattack":
            return _official(self.spec, model, x.device)
        if self.spec.library == "torchattacks":
            try:
                return self.cls(model, **self.spec.kwargs)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"attack {self.spec}: {exc}") from None
        from art.estimators.classification import PyTorchClassifier

        with torch.no_grad(), model_mode(model, False):
            nb_classes = int(model(x[:1]).shape[1])
        estimator = PyTorchClassifier(
            model=_Float32(model),
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(x.shape[1:]),
            nb_classes=nb_classes,
            clip_values=(0.0, 1.0),
            device_type="gpu" if x.is_cuda else "cpu",
        )
        kwargs = dict(self.spec.kwargs)
        if "verbose" in inspect.signature(getattr(self.cls, "__init__")).parameters:
            kwargs.setdefault("verbose", False)
        try:
            return self.cls(estimator, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"attack {self.spec}: {exc}") from None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self._model is not model:
            self._obj, self._model = self._build(model, x), model
        with model_mode(model, self.train_mode):
            if self.spec.library == "autoattack":
                adv, _ = self._obj.run_standard_evaluation(x.detach(), y.detach(), batch_size=len(x))
                return adv.to(x.device).detach()
            if self.spec.library == "torchattacks":
                if self.train_mode:
                    self._obj.set_model_training_mode(model_training=True, batchnorm_training=True)
                return self._obj(x, y).detach()
            adv = self._obj.generate(x=x.detach().cpu().numpy(), y=y.detach().cpu().numpy())
            return torch.as_tensor(adv, dtype=x.dtype, device=x.device).clamp_(0, 1)


def _official(spec: AttackSpec, model: nn.Module, device: torch.device) -> Any:
    """One attack of the official AutoAttack with the settings of its ``version`` (standard or rand): the package's
    own object, restricted to that attack, so the numbers are the official code's."""
    import logging

    from pyautoattack import AutoAttack

    kw = dict(spec.kwargs)
    unknown_keys = set(kw) - {"eps", "norm", "version", "seed", "n_classes"}
    if unknown_keys:
        raise ConfigError(
            f"attack {spec}: autoattack attacks take eps, norm, version and seed, not {', '.join(sorted(unknown_keys))}"
        )
    if "eps" not in kw:
        raise ConfigError(f"attack {spec}: give eps, e.g. autoattack:{spec.name}(eps=8/255)")
    adversary = AutoAttack(
        model,
        norm=kw.get("norm", "Linf"),
        eps=kw["eps"],
        version=kw.get("version", "standard"),
        seed=kw.get("seed", 0),
        device=device,
    )
    adversary.verbose = False
    adversary.logger.setLevel(logging.WARNING)  # its per-attack progress lines; our report has the rows
    adversary.attacks_to_run = [spec.name.replace("_", "-")]
    if "n_classes" in kw:  # fewer than 10 classes: target every other class (the official 9 need 10)
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = kw["n_classes"] - 1
    return adversary


def resolve_attack(spec: str | AttackSpec, *, train_mode: bool = False) -> LibraryAttack:
    """Turn a spec into a callable attack; unknown names and arguments raise ConfigError listing valid ones.

    torchattacks' ``CW`` and ``UPGD`` resolve to the corrected classes of :mod:`regdefense.attacks.fixes`."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    _check_common(spec)
    if spec.library == "autoattack":
        if spec.name not in AUTOATTACK_NAMES:
            raise ConfigError(unknown("official AutoAttack attack", spec.name, AUTOATTACK_NAMES))
        return LibraryAttack(spec, object, train_mode)
    if spec.library == "torchattacks":
        import torchattacks

        names = torchattacks_names()
        if spec.name not in names:
            raise ConfigError(unknown("torchattacks attack", spec.name, names))
        from regdefense.attacks.fixes import FIXED  # subclasses of torchattacks' attacks: imported with torchattacks

        cls = FIXED[spec.name][0] if spec.name in FIXED else getattr(torchattacks, spec.name)
        _check_kwargs(spec, cls, ("model",))
    else:
        import art.attacks.evasion as ev

        names = art_names()
        if spec.name not in names:
            raise ConfigError(unknown("ART evasion attack", spec.name, names))
        cls = getattr(ev, spec.name)
        _check_kwargs(spec, cls, ("estimator", "classifier"))
    return LibraryAttack(spec, cls, train_mode)
