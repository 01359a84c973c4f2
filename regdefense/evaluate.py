"""Robustness evaluation: run attack suites, compute every metric, run the sanity checks, write reports.

    report = evaluate_model(model, x, y, suites=["quick", "autoattack"], eps=0.2)
    report = evaluate("runs/2026...-pgd_at", suites=["autoattack"], out="runs/.../eval")

Accuracy is always measured against the true labels, per point, and the worst case over a suite is
taken per point (mean over points of the minimum over attacks), never as the minimum of the means.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from regdefense.attacks import model_mode, resolve_attack
from regdefense.errors import UserError
from regdefense.metrics import acc_drop, auroc, detection_score, perturbation_norms, psnr, wilson_interval

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


# --- building blocks (also used by the training loop) -----------------------------------------


def _oom_safe(fn: Callable[[int], Any], batch_size: int) -> Any:
    """Call ``fn(batch_size)``, halving the batch size on CUDA out-of-memory (automatic batch size)."""
    while True:
        try:
            return fn(batch_size)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            torch.cuda.empty_cache()
            batch_size //= 2


def logits_of(model: nn.Module, x: Tensor, *, batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """The model's logits (on the CPU) for ``x``, batched, in eval mode, without gradients."""
    def run(bs: int) -> Tensor:
        out = []
        with torch.no_grad(), model_mode(model, False):
            for i in range(0, len(x), bs):
                out.append(model(x[i:i + bs].to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    return _oom_safe(run, batch_size)


def attack_all(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, *, batch_size: int = 256,
               device: torch.device | str = "cpu", progress: Any = None) -> Tensor:
    """Adversarial versions of ``x`` (on the CPU), batched."""
    def run(bs: int) -> Tensor:
        out = []
        for i in range(0, len(x), bs):
            out.append(attack(model, x[i:i + bs].to(device), y[i:i + bs].to(device)).detach().cpu())
            if progress is not None:
                progress.update(min(bs, len(x) - i))
        return torch.cat(out) if out else x.clone()

    return _oom_safe(run, batch_size)


def correct(model: nn.Module, x: Tensor, y: Tensor, attack: Attack | None = None, *, batch_size: int = 256,
            device: torch.device | str = "cpu") -> Tensor:
    """Per-sample correctness (bool, on the CPU) of ``model`` on ``x`` or on ``attack(model, x, y)``."""
    if attack is not None:
        x = attack_all(model, x, y, attack, batch_size=batch_size, device=device)
    return logits_of(model, x, batch_size=batch_size, device=device).argmax(1) == y.cpu()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: Attack | None = None, **kw) -> float:
    """Fraction of samples classified correctly (under ``attack`` if given)."""
    c = correct(model, x, y, attack, **kw)
    return float(c.float().mean()) if len(c) else float("nan")


# --- one evaluation ---------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the report: an attack, a cascade group's worst case, or the suite's worst case."""

    label: str
    suite: str
    kind: str  # "attack", "cascade step", "group worst case", "worst case"
    robust: float
    ci: tuple[float, float]
    acc_drop: float
    n: int
    spec: str = ""
    eot: bool = False
    black_box: bool = False
    psnr_mean: float | None = None
    norms: dict[str, float] = field(default_factory=dict)
    auroc: float | None = None
    seconds: float = 0.0
    points: Tensor | None = field(default=None, repr=False)  #: per-point correctness (not written to JSON)


@dataclass
class Report:
    meta: dict[str, Any]
    clean: float
    clean_ci: tuple[float, float]
    rows: list[Row]
    checks: list[dict[str, Any]] = field(default_factory=list)
    protocols: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    eps_curve: list[dict[str, float]] = field(default_factory=list)
    examples: dict[str, Any] = field(default_factory=dict)  # images for the grid (not in JSON)
    clean_points: Tensor | None = field(default=None, repr=False)  #: per-point clean correctness (not in JSON)

    @property
    def worst_case(self) -> float:
        rows = [r for r in self.rows if r.kind == "worst case"]
        return rows[0].robust if rows else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "clean": self.clean, "clean_ci": list(self.clean_ci),
                "protocols": self.protocols, "rows": [{k: v for k, v in r.__dict__.items() if k != "points"} | {"ci": list(r.ci)}
                         for r in self.rows],
                "worst_case": self.worst_case, "checks": self.checks, "warnings": self.warnings,
                "robust_vs_eps": self.eps_curve}


def _row_metrics(model, x, y, adv, clean_scores, mask=None, **kw) -> dict[str, Any]:
    """PSNR, perturbation norms, detection AUROC and per-point correctness of adversarial images ``adv``."""
    sel = torch.ones(len(y), dtype=torch.bool) if mask is None else mask
    logits = logits_of(model, adv[sel], **kw)
    ps = psnr(x[sel], adv[sel])
    finite = ps[torch.isfinite(ps)]
    return {"psnr_mean": float(finite.mean()) if len(finite) else None,
            "norms": perturbation_norms(x[sel], adv[sel]),
            "auroc": auroc(clean_scores[sel], detection_score(logits)) if sel.any() else None,
            "pred_correct": logits.argmax(1) == y[sel]}


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, *, suites: list[str], eps: float | None = None,
                   default_eps: float = 8 / 255, norm: str = "linf", num_classes: int | None = None, seed: int = 0,
                   batch_size: int = 256, device: torch.device | str = "cpu", checks: bool = True,
                   check_samples: int = 256, progress: bool = True, meta: dict[str, Any] | None = None) -> Report:
    """Evaluate ``model`` on ``(x, y)`` (inputs in [0,1]) under the named suites or attack specs."""
    from regdefense.suites import build_suite

    if x.min() < 0 or x.max() > 1:
        raise UserError(f"evaluation inputs must lie in [0,1], found [{float(x.min()):g}, {float(x.max()):g}]")
    x, y = x.cpu().float(), y.cpu().long()
    n = len(y)
    kw = {"batch_size": batch_size, "device": device}
    num_classes = num_classes or int(logits_of(model, x[:2], **kw).shape[1])
    built = [build_suite(s, eps=eps, default_eps=default_eps, norm=norm, num_classes=num_classes, seed=seed)
             for s in suites]
    clean_logits = logits_of(model, x, **kw)
    clean_ok = clean_logits.argmax(1) == y
    clean_acc = float(clean_ok.float().mean())
    clean_scores = detection_score(clean_logits)
    rows: list[Row] = []
    worst = clean_ok.clone()
    example_rows: dict[str, Tensor] = {}
    total = sum(len(s.attacks) for s in built) * n
    bar = _bar(total, "attacks", progress)

    def make_row(label, suite, kind, ok, a=None, spec="", metrics=None, seconds=0.0):
        acc = float(ok.float().mean())
        m = metrics or {}
        return Row(label=label, suite=suite, kind=kind, robust=acc, ci=wilson_interval(int(ok.sum()), n),
                   acc_drop=acc_drop(clean_acc, acc), n=n, spec=spec, eot=bool(a and a.eot),
                   black_box=bool(a and a.black_box), psnr_mean=m.get("psnr_mean"), norms=m.get("norms", {}),
                   auroc=m.get("auroc"), seconds=seconds, points=ok.clone())

    for suite in built:
        groups: dict[str, tuple[Tensor, Tensor]] = {}  # group -> (still robust, adversarial images)
        for a in suite.attacks:
            attack = resolve_attack(a.spec)
            torch.manual_seed(seed)
            started = time.perf_counter()
            target = model
            if a.surrogate == "bpda":
                target = getattr(model, "bpda_model", None)
                if target is None:
                    raise UserError("suite bpda-pgd needs a model with a purifier (it has no bpda_model); "
                                    "evaluate an atop run")
            if a.group is None:
                adv = attack_all(target, x, y, attack, progress=bar, **kw)
                m = _row_metrics(model, x, y, adv, clean_scores, **kw)
                ok = m.pop("pred_correct")
                worst &= ok
                rows.append(make_row(a.label, suite.name, "attack", ok, a, a.spec, m, time.perf_counter() - started))
            else:
                robust, adv = groups.get(a.group, (clean_ok.clone(), x.clone()))
                idx = robust.nonzero().flatten()
                if len(idx):
                    adv[idx] = attack_all(model, x[idx], y[idx], attack, **kw)
                    robust = robust.clone()
                    robust[idx] = logits_of(model, adv[idx], **kw).argmax(1) == y[idx]
                if bar is not None:
                    bar.update(n)
                groups[a.group] = (robust, adv)
                rows.append(make_row(f"{a.group}: after {a.label}", suite.name, "cascade step", robust, a, a.spec,
                                     seconds=time.perf_counter() - started))
            example_rows.setdefault(a.label if len(built) == 1 else f"{suite.name}: {a.label}", adv[:8].clone())
        for group, (robust, adv) in groups.items():
            worst &= robust
            m = _row_metrics(model, x, y, adv, clean_scores, mask=clean_ok, **kw)
            m.pop("pred_correct")
            steps = [r for r in rows if r.label.startswith(group + ": ") and r.suite == suite.name]
            rows.append(make_row(f"{group} (worst case)", suite.name, "group worst case", robust,
                                 spec=" -> ".join(a.label for a in suite.attacks if a.group == group), metrics=m,
                                 seconds=sum(r.seconds for r in steps)))
    if bar is not None:
        bar.close()
    rows.append(make_row("worst case over all attacks", "all", "worst case", worst))
    report = Report(meta=dict(meta or {}) | {"n": n, "eps": built[0].eps if built else eps, "norm": norm,
                                               "seed": seed, "suites": suites, "num_classes": num_classes},
                    clean=clean_acc, clean_ci=wilson_interval(int(clean_ok.sum()), n), rows=rows,
                    protocols={s.name: s.protocol for s in built})
    for s in built:
        report.warnings += s.notes
    report.examples = {"clean": x[:8].clone(), "labels": y[:8].clone(), **example_rows}
    report.clean_points = clean_ok.clone()
    if checks:
        from regdefense.checks import run_checks

        run_checks(report, model, x, y, eps=report.meta["eps"], norm=norm, num_classes=num_classes, seed=seed,
                   n_check=check_samples, suites=built, **kw)
    return report


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


# --- what to evaluate -------------------------------------------------------------------------


@dataclass
class Target:
    model: nn.Module
    x: Tensor
    y: Tensor
    default_eps: float
    norm: str
    num_classes: int
    device: torch.device
    meta: dict[str, Any]
    run_dir: Path | None = None


def load_target(target: str | Path, *, which: str = "best", arch: str | None = None, dataset: str | None = None,
                device: str = "auto") -> Target:
    """Load what to evaluate.

    :param target: a run directory (its ``checkpoints/<which>.pt``), a regdefense checkpoint, or, with
        ``arch``, a user's state_dict file (``arch`` = an architecture name) or TorchScript file
        (``arch="torchscript"``).
    :param dataset: the data to evaluate on (default: the run's, else ``digits``); the test split is used.
    """
    from regdefense import checkpoint
    from regdefense.config import DataConfig
    from regdefense.data import load_data
    from regdefense.trainer import resolve_device

    path = Path(target)
    if not path.exists():
        raise UserError(f"nothing to evaluate at {path}: give a run directory, a checkpoint or a model file")
    dev = resolve_device(device)
    if arch is None:
        if path.is_dir():
            ckpt = path / "checkpoints" / f"{which}.pt"
            if not ckpt.exists():
                raise UserError(f"{path} holds no checkpoints/{which}.pt")
        else:
            ckpt = path
        payload = checkpoint.load(ckpt)
        return _target_from_payload(payload, ckpt, dataset, device)
    data = load_data(DataConfig(name=dataset or "digits", val_fraction=0.0))
    c, h, w = data.input_shape
    if arch == "torchscript":
        try:
            model = torch.jit.load(str(path), map_location=dev)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{path} is not a TorchScript file: {str(exc).splitlines()[0]}") from None
    else:
        from regdefense.models import create_model

        model = create_model(arch, in_channels=c, num_classes=data.num_classes, image_size=min(h, w))
        state = checkpoint.read(path)  # a checksummed regdefense file or a plain state_dict; never unpickles code
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise UserError(f"{path} does not fit architecture '{arch}': {str(exc).splitlines()[0][:300]}") from None
        model.to(dev)
    return Target(model=model.eval(), x=data.test.floats(), y=data.test.y, default_eps=data.default_eps, norm="linf",
                  num_classes=data.num_classes, device=dev,
                  meta={"target": str(path), "dataset": data.name, "model": arch})


def _target_from_payload(payload: dict[str, Any], ckpt: Path, dataset: str | None, device: str) -> Target:
    from regdefense.run import load_config
    from regdefense.trainer import Trainer

    raw = dict(payload["config"])
    missing = _drop_training_only(raw, payload)
    overrides = {"train": {"device": device, "progress": False, "compile": False}}
    if dataset:
        overrides["data"] = {"name": dataset}
    cfg = load_config(raw=raw, overrides=overrides)
    trainer = Trainer(cfg)
    trainer.hook.regdefense_fit_start(trainer=trainer)  # defenses build their state, then it is loaded into them
    trainer.restore_state(payload, for_evaluation=True)
    model = trainer.hook.regdefense_eval_model(trainer=trainer)
    test = trainer.data.test
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return Target(model=model, x=test.floats(), y=test.y, default_eps=trainer.eps_full, norm=trainer.norm,
                  num_classes=trainer.data.num_classes, device=trainer.device, run_dir=run_dir,
                  meta={"target": str(ckpt), "dataset": cfg.data.name, "stack": cfg.defenses,
                        "epoch": payload["epoch"], "model": type(trainer.raw_model).__name__,
                        **({"not_installed_training_only": missing} if missing else {})})


def _drop_training_only(raw: dict[str, Any], payload: dict[str, Any]) -> list[str]:
    """Remove from a checkpoint's config the defenses that are not installed here but only trained (they do not build
    the evaluated model); refuse, naming the distribution, when one that builds it is missing. Returns the dropped."""
    from regdefense.plugins import catalogue

    cat = catalogue()
    stack = list(raw.get("defenses", []))
    missing = [n for n in stack if n not in cat or cat[n].error]
    if not missing:
        return []
    roles = payload.get("roles")
    for name in missing:
        role = (roles or {}).get(name)
        if role is None:  # a checkpoint from before roles were recorded: we cannot tell, so ask for the plugin
            dists = ", ".join(f"{d} {v}" for d, v in (payload.get("versions") or {}).items() if d not in ("torch",))
            raise UserError(f"the run was trained with defense '{name}', which is not installed here; install it "
                            f"(the run recorded these distributions: {dists})")
        if role["eval_model"]:
            where = f"{role['dist']} {role['version']}".strip() or "an object passed in Python"
            pip = f": pip install '{role['dist']}=={role['version']}'" if role["dist"] else ""
            raise UserError(f"the run was trained with defense '{name}' ({where}), which builds the evaluated model "
                            f"(regdefense_eval_model); it is not installed here{pip}")
    raw["defenses"] = [n for n in stack if n not in missing]
    raw["defense"] = {k: v for k, v in (raw.get("defense") or {}).items() if k not in missing}
    return missing


def evaluate(target: str | Path, *, suites: list[str] | None = None, eps: float | None = None, n: int | None = None,
             seed: int = 0, which: str = "best", arch: str | None = None, dataset: str | None = None,
             device: str = "auto", batch_size: int = 256, checks: bool = True, out: str | Path | None = None,
             progress: bool = True, check_samples: int = 256) -> tuple[Report, dict[str, Path]]:
    """Evaluate a run, checkpoint or model file and write the report files.

    :param suites: suite names (``quick``, ``paper-001``, ``paper-002``, ``autoattack``,
        ``autoattack-ta``, ``autoattack-rand``, ...) or attack specs; default ``["quick"]``.
    :param n: evaluate the first ``n`` test points (default: all).
    :param out: where to write the reports (default: ``RUN_DIR/eval`` or next to the file).
    :return: the report and the paths written.
    """
    from regdefense import report as reporting

    if eps is not None and eps < 0:
        raise UserError(f"--eps must be >= 0, got {eps}")
    t = load_target(target, which=which, arch=arch, dataset=dataset, device=device)
    x, y = (t.x[:n], t.y[:n]) if n else (t.x, t.y)
    torch.manual_seed(seed)
    rep = evaluate_model(t.model, x, y, suites=suites or ["quick"], eps=eps, default_eps=t.default_eps, norm=t.norm,
                         num_classes=t.num_classes, seed=seed, batch_size=batch_size, device=t.device, checks=checks,
                         progress=progress, meta=t.meta, check_samples=check_samples)
    if out is None:
        out = (t.run_dir / "eval") if t.run_dir is not None else Path(target).with_suffix("").parent / "eval"
    _add_best_known(rep, t, Path(out))
    return rep, reporting.write(rep, Path(out))


def _add_best_known(rep: Report, t: Target, out: Path) -> None:
    """Add this evaluation to the checkpoint's ledger (``out/ledger.json``) and its best-known row to the report."""
    from regdefense import ledger

    weights = Path(str(t.meta.get("target", "")))
    if not weights.is_file():
        return
    rep.meta["weights_sha256"] = ledger.fingerprint(weights)
    rep.meta.setdefault("dataset", "")
    broken = {f"{r.label} ({r.suite})": r.points for r in rep.rows
              if r.kind in ("attack", "cascade step") and r.points is not None}
    entry = ledger.record(out / "ledger.json", rep.meta, rep.clean_points, broken)
    value, count = ledger.headline(entry, rep.meta["n"])
    ok = torch.tensor([entry["points"][str(i)]["broken_by"] is None for i in range(count)])
    rep.rows.append(Row(label=f"best known (ledger: {len(entry['attacks'])} attacks so far)", suite="ledger",
                        kind="best known", robust=value, ci=wilson_interval(int(ok.sum()), count),
                        acc_drop=acc_drop(rep.clean, value), n=count, points=ok))
    rep.meta["best_known"] = {"robust": value, "n": count, "attacks": list(entry["attacks"]),
                              "broken_by": {i: p["broken_by"] for i, p in entry["points"].items()
                                            if int(i) < count and p["broken_by"] not in (None, "clean")}}
