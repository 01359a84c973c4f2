"""Robustness evaluation: run attack suites, compute every metric, run the sanity checks, write reports.

    report = evaluate_model(model, x, y, suites=["quick", "autoattack"], eps=0.2)
    report = evaluate("runs/2026...-pgd_at", suites=["autoattack"], out="runs/.../eval")

Accuracy is always measured against the true labels, per point, and the worst case over a suite is
taken per point (mean over points of the minimum over attacks), never as the minimum of the means.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from regdefense.attacks import model_mode, resolve_attack
from regdefense.errors import UserError
from regdefense.metrics import acc_drop, detection_score, per_point, summarise, wilson_interval

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


#: what torch says when an attack differentiates an output that does not depend differentiably on the input
_NO_GRAD = ("does not require grad", "appears to not have been used in the graph", "does not have a grad_fn")


def batch_seed(seed: int, first: int) -> int:
    """The seed of the batch starting at point ``first`` of an evaluation seeded ``seed``."""
    return seed * 1_000_003 + first


class NoInputGradient(UserError):
    """A gradient-based attack found no path from the model's output back to its input (a detached forward)."""


def attack_points(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, *, measure: nn.Module | None = None,
                  batch_size: int = 256, device: torch.device | str = "cpu", progress: Any = None, slot: Any = None,
                  seed: int | None = None, first_index: int = 0) -> tuple[Tensor, Tensor]:
    """Adversarial versions of ``x`` and, per point, whether ``measure`` (default: ``model``) still classifies them
    correctly; both on the CPU, computed batch by batch.

    :param measure: the model whose predictions count (an attack run on a BPDA view is measured on the real model).
    :param slot: a :class:`regdefense.resume.Slot`: its finished points are reused, each new batch is added to it.
    :param seed: seed each batch with ``seed`` and its first index (``first_index`` + its position), so a resumed or
        chunked run draws what a whole one draws.
    :raises NoInputGradient: the attack needed an input gradient the model does not have.
    """
    measure = model if measure is None else measure

    def run(bs: int) -> tuple[Tensor, Tensor]:
        advs, oks, start = [], [], 0
        prev = slot.restored(x) if slot is not None else None
        if prev is not None:
            advs, oks, start = [prev[0]], [prev[1]], slot.done
            if progress is not None:
                progress.update(start)
        for i in range(start, len(x), bs):
            if seed is not None:
                torch.manual_seed(batch_seed(seed, first_index + i))
            xb, yb = x[i:i + bs].to(device), y[i:i + bs].to(device)
            try:
                adv = attack(model, xb, yb).detach()
            except RuntimeError as exc:
                if any(m in str(exc) for m in _NO_GRAD):
                    raise NoInputGradient(f"no input gradient: the model's output does not depend differentiably on "
                                          f"its input ({str(exc).splitlines()[0][:120]})") from None
                raise
            with torch.no_grad(), model_mode(measure, False):
                ok = (measure(adv).argmax(1) == yb).cpu()
            advs.append(adv.cpu())
            oks.append(ok)
            if slot is not None:
                slot.add(x[i:i + bs], adv, ok)
            if progress is not None:
                progress.update(len(yb))
        if not advs:
            return x.clone(), torch.zeros(0, dtype=torch.bool)
        return torch.cat(advs), torch.cat(oks)

    return _oom_safe(run, batch_size)


def attack_all(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, *, batch_size: int = 256,
               device: torch.device | str = "cpu", progress: Any = None) -> Tensor:
    """Adversarial versions of ``x`` (on the CPU), batched."""
    return attack_points(model, x, y, attack, batch_size=batch_size, device=device, progress=progress)[0]


def correct(model: nn.Module, x: Tensor, y: Tensor, attack: Attack | None = None, *, batch_size: int = 256,
            device: torch.device | str = "cpu") -> Tensor:
    """Per-sample correctness (bool, on the CPU) of ``model`` on ``x`` or on ``attack(model, x, y)``."""
    if attack is not None:
        return attack_points(model, x, y.cpu(), attack, batch_size=batch_size, device=device)[1]
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
    #: per-point PSNR, norms and detection scores behind the metrics, and the points they cover (not in JSON)
    per_point: dict[str, Tensor] | None = field(default=None, repr=False)
    mask: Tensor | None = field(default=None, repr=False)


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
    #: the checks' attacks, per point of the first ``meta["checks_on"]`` points (the ledger records them)
    check_points: dict[str, Tensor] = field(default_factory=dict, repr=False)
    clean_scores: Tensor | None = field(default=None, repr=False)  #: per-point clean detection scores (not in JSON)

    @property
    def worst_case(self) -> float:
        rows = [r for r in self.rows if r.kind == "worst case"]
        return rows[0].robust if rows else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "clean": self.clean, "clean_ci": list(self.clean_ci),
                "protocols": self.protocols,
                "rows": [{k: v for k, v in r.__dict__.items() if k not in ("points", "per_point", "mask")} | {"ci": list(r.ci)}
                         for r in self.rows],
                "worst_case": self.worst_case, "checks": self.checks, "warnings": self.warnings,
                "robust_vs_eps": self.eps_curve}


def _point_metrics(model, x, adv, **kw) -> dict[str, Tensor]:
    """Per-point PSNR, perturbation norms and detection score of adversarial images ``adv``."""
    return per_point(x, adv, logits_of(model, adv, **kw))


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, *, suites: list[str], eps: float | None = None,
                   default_eps: float = 8 / 255, norm: str = "linf", num_classes: int | None = None, seed: int = 0,
                   batch_size: int = 256, device: torch.device | str = "cpu", checks: bool = True,
                   check_samples: int = 256, progress: bool = True, meta: dict[str, Any] | None = None,
                   state_path: str | Path | None = None, surrogate: nn.Module | None = None, first_index: int = 0,
                   keep_progress: bool = False) -> Report:
    """Evaluate ``model`` on ``(x, y)`` (inputs in [0,1]) under the named suites or attack specs.

    :param state_path: save the attacks' progress there as they go and resume from it (see :mod:`regdefense.resume`);
        the file is removed when the evaluation completes.
    :param surrogate: a model trained without any defense on the same data, for the transfer check.
    :param first_index: the position of ``x[0]`` in a larger evaluation (a chunk's offset; seeds batches).
    :param keep_progress: leave the progress file in place at the end (the chunks of one evaluation).
    """
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
    warnings: list[str] = []
    worst = clean_ok.clone()
    example_rows: dict[str, Tensor] = {}
    state = None
    if state_path is not None:
        from regdefense.resume import EvalState, digest, model_digest

        state = EvalState(state_path, {"points": digest(x, y), "weights": model_digest(model), "suites": list(suites),
                                       "eps": eps, "default_eps": default_eps, "norm": norm, "seed": seed})
        if state.note and progress:
            print(state.note)
    bar = _bar(sum(len(s.attacks) for s in built) * n, "attacks", progress)

    def make_row(label, suite, kind, ok, a=None, spec="", pp=None, mask=None, seconds=0.0):
        acc = float(ok.float().mean())
        m = summarise(pp, clean_scores, mask) if pp is not None else {}
        return Row(label=label, suite=suite, kind=kind, robust=acc, ci=wilson_interval(int(ok.sum()), n),
                   acc_drop=acc_drop(clean_acc, acc), n=n, spec=spec, eot=bool(a and a.eot),
                   black_box=bool(a and a.black_box), psnr_mean=m.get("psnr_mean"), norms=m.get("norms", {}),
                   auroc=m.get("auroc"), seconds=seconds, points=ok.clone(), per_point=pp, mask=mask)

    try:
        for suite in built:
            groups: dict[str, tuple[Tensor, Tensor]] = {}  # group -> (still robust, adversarial images)
            for a in suite.attacks:
                attack = resolve_attack(a.spec)
                started = time.perf_counter()
                if bar is not None:
                    bar.set_description(f"{suite.name}: {a.label}")
                target = model
                if a.surrogate == "bpda":
                    target = getattr(model, "bpda_model", None)
                    if target is None:
                        raise UserError("suite bpda-pgd needs a model with a purifier (it has no bpda_model); "
                                        "evaluate an atop run")
                robust, adv = groups.get(a.group, (clean_ok.clone(), x.clone())) if a.group else (None, x.clone())
                idx = robust.nonzero().flatten() if a.group else torch.arange(n)
                try:
                    adv_i, ok_i = attack_points(target, x[idx], y[idx], attack, measure=model, progress=bar, seed=seed,
                                                slot=state.slot(f"{suite.name}/{a.label}") if state else None,
                                                first_index=first_index, **kw)
                except NoInputGradient as exc:
                    adv_i, ok_i = x[idx].clone(), clean_ok[idx].clone()
                    warnings.append(f"{suite.name}: {a.label} did not run — {exc}; its row is the clean accuracy and "
                                    f"means nothing: see the transfer, black-box and BPDA checks")
                    if bar is not None:
                        bar.update(len(idx))
                adv[idx] = adv_i
                seconds = time.perf_counter() - started
                if a.group is None:
                    worst &= ok_i
                    rows.append(make_row(a.label, suite.name, "attack", ok_i, a, a.spec,
                                         _point_metrics(model, x, adv, **kw), seconds=seconds))
                else:
                    robust = robust.clone()
                    robust[idx] = ok_i
                    if bar is not None:
                        bar.update(n - len(idx))  # the points already broken count as done
                    groups[a.group] = (robust, adv)
                    rows.append(make_row(f"{a.group}: after {a.label}", suite.name, "cascade step", robust, a, a.spec,
                                         seconds=seconds))
                example_rows.setdefault(a.label if len(built) == 1 else f"{suite.name}: {a.label}", adv[:8].clone())
            for group, (robust, adv) in groups.items():
                worst &= robust
                steps = [r for r in rows if r.label.startswith(group + ": ") and r.suite == suite.name]
                rows.append(make_row(f"{group} (worst case)", suite.name, "group worst case", robust,
                                     spec=" -> ".join(a.label for a in suite.attacks if a.group == group),
                                     pp=_point_metrics(model, x, adv, **kw), mask=clean_ok.clone(),
                                     seconds=sum(r.seconds for r in steps)))
    except BaseException:  # an interruption (Ctrl-C, a killed job, an error): keep every finished batch
        if state is not None:
            state.save()
        raise
    finally:
        if bar is not None:
            bar.close()
    rows.append(make_row("worst case over all attacks", "all", "worst case", worst))
    report = Report(meta=dict(meta or {}) | {"n": n, "eps": built[0].eps if built else eps, "norm": norm,
                                               "seed": seed, "suites": suites, "num_classes": num_classes},
                    clean=clean_acc, clean_ci=wilson_interval(int(clean_ok.sum()), n), rows=rows,
                    protocols={s.name: s.protocol for s in built})
    for s in built:
        report.warnings += s.notes
    report.warnings += warnings
    report.examples = {"clean": x[:8].clone(), "labels": y[:8].clone(), **example_rows}
    report.clean_points = clean_ok.clone()
    report.clean_scores = clean_scores
    if checks:
        from regdefense.checks import run_checks

        run_checks(report, model, x, y, eps=report.meta["eps"], norm=norm, num_classes=num_classes, seed=seed,
                   n_check=check_samples, suites=built, surrogate=surrogate, **kw)
    if state is not None and not keep_progress:
        state.finish()
    return report


def merge(reports: list[Report]) -> Report:
    """One report from the reports of consecutive chunks of the same evaluation: per-point results concatenated and
    every metric recomputed over all points; the sanity checks, the ε curve and the example images are the first
    chunk's (the checks run on the first ``check_samples`` points)."""
    first = reports[0]
    if len(reports) == 1:
        return first
    cat = torch.cat
    clean_ok = cat([r.clean_points for r in reports])
    scores = cat([r.clean_scores for r in reports])
    n, clean = len(clean_ok), float(clean_ok.float().mean())
    rows = []
    for j, row in enumerate(first.rows):
        parts = [r.rows[j] for r in reports]
        if any((p.label, p.kind) != (row.label, row.kind) for p in parts):
            raise ValueError(f"chunk reports disagree at row {j}: {[p.label for p in parts]}")
        ok = cat([p.points for p in parts])
        pp = {k: cat([p.per_point[k] for p in parts]) for k in row.per_point} if row.per_point else None
        mask = cat([p.mask for p in parts]) if row.mask is not None else None
        m = summarise(pp, scores, mask) if pp is not None else {}
        acc = float(ok.float().mean())
        rows.append(dataclasses.replace(row, robust=acc, ci=wilson_interval(int(ok.sum()), n), acc_drop=acc_drop(clean, acc),
                                        n=n, psnr_mean=m.get("psnr_mean", row.psnr_mean),
                                        norms=m.get("norms", row.norms), auroc=m.get("auroc", row.auroc),
                                        seconds=sum(p.seconds for p in parts), points=ok, per_point=pp, mask=mask))
    warnings = list(dict.fromkeys(w for r in reports for w in r.warnings))
    return dataclasses.replace(first, meta=first.meta | {"n": n, "chunks": len(reports)}, clean=clean,
                               clean_ci=wilson_interval(int(clean_ok.sum()), n), rows=rows, warnings=warnings,
                               clean_points=clean_ok, clean_scores=scores)


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
    data_config: dict[str, Any] = field(default_factory=dict)  #: the run's data section (for a clean surrogate)
    split: Any = None  #: the evaluated test split (x holds its first points, decoded)
    count: int = 0  #: how many of its points are evaluated


def select_points(test, n: int | None = None, subset: str | None = None):
    """The evaluated part of a test split: its ``subset`` (see :func:`regdefense.stream.subset_of`), then the first
    ``n``. Returns the (sub)split and how many points of it are evaluated; nothing is decoded."""
    if subset is not None:
        from regdefense.stream import subset_of

        test = subset_of(test, subset)
    return test, (min(n, len(test)) if n else len(test))


def load_target(target: str | Path, *, which: str = "best", arch: str | None = None, dataset: str | None = None,
                device: str = "auto", n: int | None = None, subset: str | None = None,
                decode: int | None = None) -> Target:
    """Load what to evaluate.

    :param target: a run directory (its ``checkpoints/<which>.pt``), a regdefense checkpoint, or, with
        ``arch``, a user's state_dict file (``arch`` = an architecture name) or TorchScript file
        (``arch="torchscript"``).
    :param dataset: the data to evaluate on (default: the run's, else ``digits``); the test split is used.
    :param n: only the first ``n`` test points (of the subset).
    :param decode: decode only the first ``decode`` of them into ``Target.x`` (the rest stay in ``Target.split``).
    :param subset: ``robustbench`` (RobustBench's fixed 5 000 ImageNet validation images) or a file listing the
        test images to use, one path per line relative to the test folder.
    """
    from regdefense import checkpoint
    from regdefense.config import DataConfig
    from regdefense.data import load_data
    from regdefense.trainer import resolve_device

    from regdefense.export import is_export, resolve

    if isinstance(target, str) and target.startswith("robustbench:"):
        return _zoo_target(target, dataset, device, n, subset, decode)
    path = Path(resolve(target))  # hf:ORG/NAME → its export folder in the Hugging Face cache
    if not path.exists():
        raise UserError(f"nothing to evaluate at {path}: give a run directory, a checkpoint, an export folder, "
                        f"hf:ORG/NAME, robustbench:NAME or a model file")
    dev = resolve_device(device)
    if arch is None and is_export(path):
        return _export_target(path, str(target), dataset, device, n, subset, decode)
    if arch is None:
        if path.is_dir():
            ckpt = path / "checkpoints" / f"{which}.pt"
            if not ckpt.exists():
                raise UserError(f"{path} holds no checkpoints/{which}.pt")
        else:
            ckpt = path
        payload = checkpoint.load(ckpt)
        return _target_from_payload(payload, ckpt, dataset, device, n, subset, decode)
    data = _test_data(dataset or "digits", subset)
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
    return _model_target(model, data, data.default_eps, "linf", device, n, subset, decode,
                         {"target": str(path), "dataset": data.name, "model": arch})


def _test_data(name: str, subset: str | None):
    from regdefense.config import DataConfig
    from regdefense.data import load_data

    return load_data(DataConfig(name=name, val_fraction=0.0, stream="on" if subset else "auto"))


def _model_target(model: nn.Module, data, eps: float, norm: str, device: str, n: int | None, subset: str | None,
                  decode: int | None, meta: dict[str, Any]) -> Target:
    from regdefense.trainer import resolve_device

    dev = resolve_device(device)
    split, count = select_points(data.test, n, subset)
    x, y = _decode(split, 0, min(count, decode or count))
    return Target(model=model.to(dev).eval(), x=x, y=y, split=split, count=count, default_eps=eps, norm=norm,
                  num_classes=data.num_classes, device=dev, data_config={"name": data.name}, meta=meta)


def _export_target(folder: Path, target: str, dataset: str | None, device: str, n: int | None, subset: str | None,
                   decode: int | None) -> Target:
    """An export folder (``regdefense export``, or ``hf:ORG/NAME`` fetched): its model on its data's test split."""
    from regdefense.export import load

    info = json.loads((folder / "config.json").read_text())
    data = _test_data(dataset or info.get("dataset") or "digits", subset)
    if list(data.input_shape) != list(info["input_shape"]):
        raise UserError(f"{target} takes images of shape {info['input_shape']}; {data.name}'s are "
                        f"{list(data.input_shape)}: pick its data with --dataset")
    return _model_target(load(folder), data, info["threat"]["eps"], info["threat"]["norm"], device, n, subset, decode,
                         {"target": target, "dataset": data.name, "model": info["architecture"],
                          "stack": info.get("stack", []), "epoch": info.get("epoch"), "source": info.get("source")})


#: RobustBench's budgets per leaderboard
ZOO_EPS = {("cifar10", "Linf"): 8 / 255, ("cifar100", "Linf"): 8 / 255, ("imagenet", "Linf"): 4 / 255,
           ("cifar10", "L2"): 0.5, ("cifar100", "L2"): 0.5}


def _zoo_target(target: str, dataset: str | None, device: str, n: int | None, subset: str | None,
                decode: int | None) -> Target:
    """``robustbench:NAME``: the zoo model (robustbench's loader) on its leaderboard's test split and budget."""
    from regdefense.models.robustbench_zoo import load, parse

    name, ds, threat = parse(target, dataset)
    if threat == "corruptions":
        raise UserError(f"{target} is a common-corruptions model; regdefense evaluates adversarial threat models")
    model = load(target, dataset)
    data = _test_data(dataset or ds, subset)
    return _model_target(model, data, ZOO_EPS[(ds, threat)], threat.lower(), device, n, subset, decode,
                         {"target": target, "dataset": data.name, "model": f"robustbench:{ds}/{threat}/{name}"})


def _decode(split, start: int, stop: int) -> tuple[Tensor, Tensor]:
    return split.floats(torch.arange(start, stop)), split.y[start:stop]


def _target_from_payload(payload: dict[str, Any], ckpt: Path, dataset: str | None, device: str, n: int | None = None,
                         subset: str | None = None, decode: int | None = None) -> Target:
    from regdefense.run import load_config
    from regdefense.trainer import Trainer

    raw = dict(payload["config"])
    missing = _drop_training_only(raw, payload)
    overrides = {"train": {"device": device, "progress": False, "compile": False},
                 "data": {"extra": [], "teacher": None}}  # evaluation reads the test split only: no extra data
    if dataset:
        overrides["data"]["name"] = dataset
    cfg = load_config(raw=raw, overrides=overrides)
    trainer = Trainer(cfg)
    trainer.hook.regdefense_fit_start(trainer=trainer)  # defenses build their state, then it is loaded into them
    trainer.restore_state(payload, for_evaluation=True)
    model = trainer.hook.regdefense_eval_model(trainer=trainer)
    split, count = select_points(trainer.data.test, n, subset)
    x, y = _decode(split, 0, min(count, decode or count))
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return Target(model=model, x=x, y=y, split=split, count=count, default_eps=trainer.eps_full, norm=trainer.norm,
                  num_classes=trainer.data.num_classes, device=trainer.device, run_dir=run_dir,
                  data_config=dict(raw.get("data") or {}) | {"extra": [], "teacher": None}
                  | ({"name": dataset} if dataset else {}),
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
             progress: bool = True, check_samples: int = 256, resume: bool = True,
             surrogate: str | Path | nn.Module | None = "auto", surrogate_epochs: int = 10,
             subset: str | None = None, chunk: int | None = None) -> tuple[Report, dict[str, Path]]:
    """Evaluate a run, checkpoint or model file and write the report files.

    :param suites: suite names (``quick``, ``paper-001``, ``paper-002``, ``autoattack``,
        ``autoattack-ta``, ``autoattack-rand``, ...) or attack specs; default ``["quick"]``.
    :param n: evaluate the first ``n`` test points (default: all).
    :param chunk: evaluate this many points at a time (decoded, attacked, then dropped), merging their per-point
        results: the memory of an evaluation then follows the chunk, not the test set (ImageNet's 50 000 images).
    :param subset: evaluate a fixed subset of the test images: ``robustbench`` (RobustBench's 5 000 ImageNet
        validation images) or a file of paths (see :func:`load_target`); ``n`` then counts within it.
    :param out: where to write the reports (default: ``RUN_DIR/eval`` or next to the file).
    :param resume: save progress to ``OUT/progress.pt`` as attacks finish batches, and continue from it.
    :param surrogate: for the transfer check: ``"auto"`` (a model trained ``surrogate_epochs`` epochs without any
        defense on the same data, trained once and cached, see :func:`clean_surrogate`), a run directory or
        checkpoint of such a model, a module, or None to skip the check.
    :return: the report and the paths written.
    """
    from regdefense import report as reporting

    if eps is not None and eps < 0:
        raise UserError(f"--eps must be >= 0, got {eps}")
    t = load_target(target, which=which, arch=arch, dataset=dataset, device=device, n=n, subset=subset, decode=chunk)
    if out is None:
        if t.run_dir is not None:
            out = t.run_dir / "eval"
        elif str(target).startswith(("hf:", "robustbench:")):
            out = Path("eval") / str(target).replace(":", "-").replace("/", "--")
        else:
            out = Path(target) / "eval" if Path(target).is_dir() else Path(target).with_suffix("").parent / "eval"
    sur = None
    if checks and surrogate is not None:
        sur = surrogate if isinstance(surrogate, nn.Module) else (
            clean_surrogate(t.data_config, epochs=surrogate_epochs, device=device, echo=print if progress else None)
            if surrogate == "auto" else load_target(surrogate, which="last" if Path(surrogate).is_dir() else which,
                                                    dataset=dataset, device=device, n=1).model)
    size = chunk or t.count
    reports, files = [], []
    for k, start in enumerate(range(0, t.count, size)):
        x, y = (t.x, t.y) if k == 0 else _decode(t.split, start, min(start + size, t.count))
        files.append(Path(out) / (f"progress-{k}.pt" if chunk else "progress.pt"))
        torch.manual_seed(seed)
        reports.append(evaluate_model(
            t.model, x, y, suites=suites or ["quick"], eps=eps, default_eps=t.default_eps, norm=t.norm,
            num_classes=t.num_classes, seed=seed, batch_size=batch_size, device=t.device, checks=checks and k == 0,
            progress=progress, meta=t.meta, check_samples=check_samples, surrogate=sur, first_index=start,
            state_path=files[-1] if resume else None, keep_progress=True))
        del x, y
    rep = merge(reports)
    for f in files:  # the evaluation is complete: its progress is no longer needed
        f.unlink(missing_ok=True)
    _add_best_known(rep, t, Path(out))
    return rep, reporting.write(rep, Path(out))


def cache_dir() -> Path:
    """Where regdefense keeps what it can rebuild (clean surrogates): ``$REGDEFENSE_CACHE``, else
    ``$XDG_CACHE_HOME/regdefense`` or ``~/.cache/regdefense``."""
    import os

    if os.environ.get("REGDEFENSE_CACHE"):
        return Path(os.environ["REGDEFENSE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "regdefense"


#: on a CPU, ``--surrogate auto`` trains a surrogate only up to this many images (epochs × training split)
CPU_SURROGATE_IMAGES = 200_000


def clean_surrogate(data: dict[str, Any], *, epochs: int = 10, seed: int = 1, device: str = "auto",
                    echo: Callable[[str], None] | None = print) -> nn.Module | None:
    """A model of the data's default architecture trained ``epochs`` epochs with no defense on ``data`` (a run's
    data section), for the transfer check. Trained once per (data, epochs, seed) into the cache and reused. On a CPU,
    a surrogate that would take more than ``CPU_SURROGATE_IMAGES`` training images (CIFAR-10 for 10 epochs would take
    hours) is not trained: None, and the transfer check is skipped with a message."""
    import hashlib

    from regdefense.run import train
    from regdefense.trainer import resolve_device

    key = hashlib.sha256(json.dumps([data, epochs, seed], sort_keys=True, default=str).encode()).hexdigest()[:16]
    run = cache_dir() / "surrogates" / f"{data.get('name', 'data')}-{key}"
    ckpt = run / "checkpoints" / "last.pt"
    if not ckpt.exists():
        if resolve_device(device).type == "cpu":
            from regdefense.config import DataConfig
            from regdefense.data import load_data

            images = epochs * len(load_data(DataConfig(**data)).train)
            if images > CPU_SURROGATE_IMAGES:
                if echo:
                    echo(f"transfer check skipped: a clean surrogate would train on {images} images on the CPU; "
                         f"pass --surrogate RUN (a run without defenses on this data) or train on a GPU")
                return None
        if echo:
            echo(f"training a clean surrogate for the transfer check ({epochs} epochs, cached in {run}; "
                 f"--surrogate none skips it)")
        if run.exists():  # an earlier attempt stopped before its last checkpoint
            import shutil

            shutil.rmtree(run)
        train(defenses=[], overrides={"data": data, "train": {"epochs": epochs, "seed": seed, "progress": False,
                                                              "device": device},
                                      "eval": {"val_samples": 32, "pgd_steps": 1}},
              out=run, echo=lambda _m: None)
    return load_target(ckpt, device=device, n=1).model


def _add_best_known(rep: Report, t: Target, out: Path) -> None:
    """Add this evaluation to the checkpoint's ledger (``out/ledger.json``) and its best-known row to the report."""
    from regdefense import ledger

    weights = Path(str(t.meta.get("target", "")))
    if not weights.is_file():
        return
    rep.meta["weights_sha256"] = ledger.fingerprint(weights)
    rep.meta.setdefault("dataset", "")
    broken = {f"{r.label} ({r.suite})": r.points for r in rep.rows
              if r.kind in ("attack", "cascade step") and r.points is not None} | rep.check_points
    entry = ledger.record(out / "ledger.json", rep.meta, rep.clean_points, broken)
    value, count = ledger.headline(entry, rep.meta["n"])
    ok = torch.tensor([entry["points"][str(i)]["broken_by"] is None for i in range(count)])
    rep.rows.append(Row(label=f"best known (ledger: {len(entry['attacks'])} attacks so far)", suite="ledger",
                        kind="best known", robust=value, ci=wilson_interval(int(ok.sum()), count),
                        acc_drop=acc_drop(rep.clean, value), n=count, points=ok))
    rep.meta["best_known"] = {"robust": value, "n": count, "attacks": list(entry["attacks"]),
                              "broken_by": {i: p["broken_by"] for i, p in entry["points"].items()
                                            if int(i) < count and p["broken_by"] not in (None, "clean")}}
