"""Robustness evaluation: run attack suites, compute every metric, run the sanity checks, write reports.

    report = evaluate_model(model, x, y, suites=["quick", "autoattack"], eps=0.2)
    report = evaluate("runs/2026...-pgd_at", suites=["autoattack"], out="runs/.../eval")

Accuracy is always measured against the true labels, per point, and the worst case over a suite is
taken per point (mean over points of the minimum over attacks), never as the minimum of the means.
"""

from __future__ import annotations

import functools
import hashlib
import shlex
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.distributed import get_backend as dist_backend

from regdefense.attacks.measure import accuracy, attack_points, batch_seed, logits_of
from regdefense.base import distributed
from regdefense.base.config import check_linf_eps
from regdefense.base.errors import UserError, first_line
from regdefense.base.files import FolderLock
from regdefense.base.safety import Interrupted
from regdefense.evaluation import ledger, shards
from regdefense.evaluation import report as reporting
from regdefense.evaluation.bounds import UnsupportedLayer, last_linear, verified
from regdefense.evaluation.escalate import BUDGET_SECONDS as ESCALATION_BUDGET
from regdefense.evaluation.escalate import headline as escalation_headline
from regdefense.evaluation.metrics import acc_drop, wilson_interval
from regdefense.evaluation.results import Report, Row, merge
from regdefense.evaluation.resume import digest, model_digest
from regdefense.evaluation.smoothing import Certified, Progress, Settings
from regdefense.evaluation.smoothing import certify as smooth_certify
from regdefense.evaluation.smoothing import summary as smooth_summary
from regdefense.evaluation.suite_runner import evaluate_model
from regdefense.evaluation.surrogate import BUDGET_SECONDS, clean_surrogate
from regdefense.evaluation.targets import Target, _decode, load_target, select_points

__all__ = [
    "Report",
    "Row",
    "Target",
    "accuracy",
    "attack_points",
    "batch_seed",
    "clean_surrogate",
    "evaluate",
    "evaluate_model",
    "load_target",
    "logits_of",
    "merge",
    "select_points",
]


def evaluate(
    target: str | Path,
    *,
    suites: list[str] | None = None,
    eps: float | None = None,
    n: int | None = None,
    seed: int = 0,
    which: str = "best",
    arch: str | None = None,
    dataset: str | None = None,
    device: str = "auto",
    batch_size: int = 256,
    checks: bool = True,
    out: str | Path | None = None,
    progress: bool = True,
    check_samples: int = 256,
    resume: bool = True,
    surrogate: str | Path | nn.Module | None = "auto",
    surrogate_epochs: int = 10,
    surrogate_budget: float = BUDGET_SECONDS,
    subset: str | None = None,
    chunk: int | None = None,
    certify: str | None = None,
    trust_code: bool = False,
    shard: str | None = None,
    smoothing: Settings | None = None,
    adaptive: str = "auto",
    adaptive_budget: float = ESCALATION_BUDGET,
) -> tuple[Report, dict[str, Path]]:
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
    :param surrogate: for the transfer check: ``"auto"`` (the evaluated architecture trained ``surrogate_epochs``
        epochs without any defense on the same data, once, in the cache, see :func:`clean_surrogate`; not trained
        when its estimated cost is over ``surrogate_budget`` seconds), ``"train"`` (the same whatever it costs), a run
        directory or checkpoint of such a model, a module, or None to skip the check. It is trained after the attacks.
    :param certify: ``"ibp"``: also the verified accuracy by interval bound propagation (a certified lower bound on
        robustness, beside the empirical rows; a model with layers IBP cannot bound gets a warning instead);
        ``"smoothing"``: also certify the Gaussian-smoothed classifier with the settings ``smoothing`` (a table, plot
        and ledger entry of its own, never mixed with the empirical rows; see :mod:`regdefense.evaluation.smoothing`).
    :param trust_code: load a ``.pt2`` or TorchScript program (code, not data: refused without it).
    :param shard: ``"K/N"``: evaluate only the K-th of N contiguous slices of the points (whole batches) and write a
        partial to ``out/partial.pt`` (default ``out``: ``.../eval/shard-K-of-N``); ``regdefense merge`` assembles the
        report (see :mod:`regdefense.evaluation.shards`). Under torchrun (``WORLD_SIZE`` > 1) the ranks share the work
        without
        it and rank 0 writes the report; the other ranks return theirs with no files.
    :param adaptive: ``"auto"`` (default): each sanity check that warns runs the attack that answers it, within
        ``adaptive_budget`` seconds (:mod:`regdefense.evaluation.escalate`); ``"off"``: the checks only warn, as before.
    :return: the report and the paths written.
    """
    if adaptive not in ("auto", "off"):
        raise UserError(f"--adaptive must be auto or off, got {adaptive!r}")
    if certify not in (None, "ibp", "smoothing"):
        raise UserError(f"unknown certification '{certify}'; valid: ibp, smoothing")
    if certify == "smoothing" and smoothing is None:
        raise UserError("--certify smoothing needs the noise level: give --sigma (the σ the model was trained with)")
    if eps is not None and eps < 0:
        raise UserError(f"--eps must be >= 0, got {eps}")
    part = shards.parse_shard(shard) if shard is not None else None
    world = distributed.init("cpu" if device == "cpu" else None) if distributed.launched() else None
    if part and world is not None:
        raise UserError("--shard splits an evaluation into separate jobs; under torchrun the ranks share it already")
    if part and certify:
        raise UserError("--certify needs every point in one process: run it without --shard")
    if world is not None and dist_backend() == "nccl":
        world.device = torch.device("cuda", torch.cuda.current_device())
    t = load_target(
        target,
        which=which,
        arch=arch,
        dataset=dataset,
        device=device,
        n=n,
        subset=subset,
        decode=chunk,
        trust_code=trust_code,
    )
    check_linf_eps(t.norm, eps, "--eps")
    if out is None:
        if t.run_dir is not None:
            out = t.run_dir / "eval"
        elif str(target).startswith(("hf:", "robustbench:")):
            out = Path("eval") / str(target).replace(":", "-").replace("/", "--")
        else:
            out = Path(target) / "eval" if Path(target).is_dir() else Path(target).with_suffix("").parent / "eval"
        if part:
            out = Path(out) / f"shard-{part[0]}-of-{part[1]}"
    sur: Any = None
    if checks and surrogate is not None:
        if isinstance(surrogate, nn.Module):
            sur = surrogate
        elif surrogate in ("auto", "train"):  # trained after the attacks asked for, when the checks need it
            sur = functools.partial(
                clean_surrogate,
                t.data_config,
                model=t.model_config,
                epochs=surrogate_epochs,
                device=device,
                echo=print if progress else None,
                budget=surrogate_budget if surrogate == "auto" else None,
                progress=progress,
            )
        else:
            sur = load_target(
                surrogate,
                which="last" if Path(surrogate).is_dir() else which,
                dataset=dataset,
                device=device,
                n=1,
                trust_code=trust_code,
            ).model
    out = Path(out)
    _require_report_folder(out)
    stage = {"resume": resume}  # what a signal's message can promise (see _signals_stop)
    main = world is None or world.is_main  # under torchrun, rank 0 holds the folder and writes the report
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "evaluation") if main else nullcontext(), _signals_stop(out, target, stage):
        return _evaluate_chunks(
            t,
            out,
            sur,
            suites,
            eps,
            seed,
            batch_size,
            checks,
            progress and main,
            check_samples,
            resume,
            chunk,
            certify,
            stage,
            world=world,
            part=part,
            subset=subset,
            smoothing=smoothing if certify == "smoothing" else None,
            adaptive=adaptive,
            adaptive_budget=adaptive_budget,
        )


#: what an evaluation writes at the top of its folder; ``evaluations/`` is there from its first report on
REPORT_FILES = (
    "report.json",
    "report.md",
    "examples.png",
    "robust_vs_eps.png",
    "certified_vs_radius.png",
    "evaluations.md",
    "evaluations.json",
)


def _require_report_folder(out: Path) -> None:
    """``--out`` may be new, a folder of ours (it has ``evaluations/``), or one where nothing would be overwritten;
    a user's own report.md is never written over."""
    if not out.is_dir() or (out / "evaluations").is_dir():
        return
    taken = [name for name in REPORT_FILES if (out / name).exists()]
    if taken:
        raise UserError(
            f"--out {out} holds {', '.join(taken)} that no regdefense evaluation wrote there (no evaluations/ "
            f"folder); choose another --out (nothing was changed)"
        )


def _evaluate_chunks(
    t,
    out,
    sur,
    suites,
    eps,
    seed,
    batch_size,
    checks,
    progress,
    check_samples,
    resume,
    chunk,
    certify,
    stage,
    world=None,
    part=None,
    subset=None,
    smoothing=None,
    adaptive="auto",
    adaptive_budget=ESCALATION_BUDGET,
) -> tuple[Report, dict[str, Path]]:
    lo, hi = shards.split_batches(t.count, batch_size, part[1])[part[0] - 1] if part else (0, t.count)
    if hi <= lo:
        batches = -(-t.count // batch_size)
        raise UserError(
            f"--shard {part[0]}/{part[1]} has no points: {t.count} points are {batches} batches of {batch_size}, so "
            f"at most {batches} shards; use fewer shards or a smaller --batch-size"
        )
    size = chunk or max(hi - lo, 1)
    ranks = [f".rank{r}" for r in range(world.world)] if world is not None and world.enabled else [""]
    reports, files = [], []
    for k, start in enumerate(range(lo, hi, size)):
        stop = min(start + size, hi)
        x, y = (t.x[start:stop], t.y[start:stop]) if stop <= len(t.x) else _decode(t.split, start, stop)
        files += [out / (f"progress-{k}{r}.pt" if chunk else f"progress{r}.pt") for r in ranks]
        own = files[-len(ranks) + (world.rank if len(ranks) > 1 else 0)]
        torch.manual_seed(seed)
        reports.append(
            evaluate_model(
                t.model,
                x,
                y,
                suites=suites or ["quick"],
                eps=eps,
                default_eps=t.default_eps,
                norm=t.norm,
                num_classes=t.num_classes,
                seed=seed,
                batch_size=batch_size,
                device=t.device,
                checks=checks and start == 0,
                progress=progress,
                meta=t.meta,
                check_samples=check_samples,
                surrogate=sur,
                first_index=start,
                state_path=own if resume else None,
                keep_progress=True,
                world=world,
                adaptive=adaptive,
                adaptive_budget=adaptive_budget,
            )
        )
        del x, y
    rep = _merged(reports)
    if world is not None and not world.is_main:
        return rep, {}  # rank 0 writes the report, the ledger entry, and removes every rank's progress
    if part:
        return rep, _write_partial(rep, t, out, files, part, (lo, hi), suites, eps, seed, batch_size, subset)
    if certify == "ibp":
        _add_certified(rep, t)
    if smoothing is not None:
        _add_smoothing(rep, t, out, smoothing, (lo, hi, size), files if resume else None, progress)
    weights = Path(str(t.meta.get("target", "")))
    if weights.is_file():
        rep.meta["weights_sha256"] = ledger.fingerprint(weights)
    return _write_report(rep, out, files, stage)


def _labels_digest(t: Target) -> str:
    """A digest of the labels of every evaluated point (not only this shard's): shards of one evaluation agree on it
    whatever their span, and a copy of the dataset with other labels under the same name does not."""
    labels = (t.split.y if t.split is not None and hasattr(t.split, "y") else t.y)[: t.count]
    return hashlib.sha256(labels.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def _write_partial(rep, t, out, files, part, span, suites, eps, seed, batch_size, subset) -> dict[str, Path]:
    """A shard's partial: its report per point, and what every shard of the evaluation must share."""
    weights = Path(str(t.meta.get("target", "")))
    if weights.is_file():
        rep.meta["weights_sha256"] = ledger.fingerprint(weights)
    key = {
        "weights": model_digest(t.model),
        "eps": [eps, rep.meta["eps"]],
        "norm": rep.meta["norm"],
        "suites": list(suites or ["quick"]),
        "seed": seed,
        "points": [str(t.meta.get("dataset", "")), subset, t.count],
        "labels": _labels_digest(t),
        "batch_size": batch_size,
        "shard": list(part),
        "span": list(span),
        "count": t.count,
    }
    path = shards.save_partial(rep, out, key)
    for f in files:  # the shard is complete and written: its progress is no longer needed
        f.unlink(missing_ok=True)
    return {"partial": path}


def merge_shards(folders: list[str | Path], out: str | Path | None = None) -> tuple[Report, dict[str, Path]]:
    """The report of an evaluation run as ``--shard K/N`` jobs: the partials in ``folders`` merged
    (:func:`regdefense.evaluation.shards.combine`), written to ``out`` (default: the first partial's parent folder)
    with one
    best-known ledger entry, as :func:`evaluate` writes it."""
    rep = shards.combine(list(folders))
    if "headline" in rep.meta:  # computed on the first shard's points: again, on all of them
        rep.meta["headline"] = escalation_headline(rep)
    out = Path(out) if out is not None else Path(folders[0]).resolve().parent
    _require_report_folder(out)
    with FolderLock(out, "evaluation"):
        return _write_report(rep, out, [], {"resume": False})


def _merged(reports: list[Report]) -> Report:
    """The chunks' reports as one, with the top line's numbers recomputed over every point (each chunk computed its
    own on its points)."""
    rep = merge(reports)
    if len(reports) > 1 and "headline" in rep.meta:
        rep.meta["headline"] = escalation_headline(rep)
    return rep


def _write_report(rep: Report, out: Path, files: list[Path], stage: dict[str, Any]) -> tuple[Report, dict[str, Path]]:
    """Write a finished evaluation: the report first, then the progress is dropped, then the ledger entry."""
    written = reporting.record(rep, out)  # the report first: whatever happens to the ledger, the numbers are kept
    stage["report"] = written["json"]
    for f in files:  # the evaluation is complete and written: its progress is no longer needed
        f.unlink(missing_ok=True)
    if "weights_sha256" in rep.meta:
        try:
            _add_best_known(rep, out)
            _record_smoothing(rep, out)
        except ledger.LedgerError as exc:
            rep.warnings.append(f"no best-known row: {exc}")
            reporting.rewrite(rep, written)
            raise UserError(
                f"the report is written ({written['json']}), but the best-known ledger could not be updated: {exc}"
            ) from None
        reporting.rewrite(rep, written)
    return rep, written


@contextmanager
def _signals_stop(out: Path, target: str | Path, stage: dict[str, Any]) -> Iterator[None]:
    """SIGTERM (a batch scheduler's pre-emption) and SIGINT stop the evaluation at once: the attacks' progress is
    saved on the way out (see :func:`evaluate_model`) and the message says what was kept and how to go on; exit status
    143 / 130. ``stage`` says how far it got (``report``: written there, progress no longer kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        again = (
            shlex.join(["regdefense", *sys.argv[1:]])
            if Path(sys.argv[0]).name in ("regdefense", "__main__.py")
            else f"evaluate({str(target)!r}, ...) with the same arguments"
        )
        name = signal.Signals(signum).name
        if "report" in stage:
            kept = f"the report is written ({stage['report']}) but not yet in the best-known ledger"
        elif stage["resume"]:
            kept = f"the finished batches are kept in {out}/progress*.pt and the same command resumes from them"
        else:
            kept = "nothing is kept (--no-resume): the same command starts over"
        raise Interrupted(f"{name}: evaluation stopped; {kept}: {again}", signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _add_certified(rep: Report, t: Target) -> None:
    """The IBP-verified accuracy on the decoded points (``t.x``) at the report's ε, as a row of its own: with the last
    Linear layer folded into the margins (specification elision), and a second row with the naive per-logit bounds;
    only the naive row, said in a warning, when the model's output is not a Linear layer."""
    if rep.meta["norm"] != "linf":
        rep.warnings.append(f"IBP certification: bounds an L∞ ball, the threat model is {rep.meta['norm']}")
        return
    assert rep.clean_points is not None
    x, y, clean = t.x.to(t.device), t.y.to(t.device), rep.clean_points[: len(t.x)]
    try:
        elided = last_linear(t.model) is not None
        naive = verified(t.model, x, y, rep.meta["eps"], elide=False) & clean
        ok = verified(t.model, x, y, rep.meta["eps"]) & clean if elided else naive
    except UnsupportedLayer as exc:
        rep.warnings.append(f"IBP certification not applicable: {first_line(exc, 300)}")
        return
    row = _verdict_row("IBP verified (certified lower bound)", "certify", "certified", ok, rep.clean)
    rep.rows.append(row)
    if elided:
        rep.rows.append(_verdict_row("IBP verified, naive bounds", "certify", "certified", naive, rep.clean))
    else:
        rep.warnings.append(
            "IBP certification: the model's output is not a Linear layer, so the margins cannot be folded into it "
            "(specification elision): the certificate uses the naive per-logit bounds"
        )
    rep.meta["certified"] = {
        "method": "ibp",
        "bounds": "elided" if elided else "naive",
        "verified": row.robust,
        "verified_naive": float(naive.float().mean()) if len(naive) else float("nan"),
        "n": row.n,
        "eps": rep.meta["eps"],
    }


def _add_smoothing(rep: Report, t: Target, out: Path, s: Settings, span, files: list[Path] | None, progress: bool):
    """Certify the evaluated points with randomized smoothing, chunk by chunk (each point's noise seeded by its index
    in the evaluation), resuming from ``out/smoothing*.pt`` (added to ``files``: removed once the report is written);
    the table goes to ``meta["smoothing"]``, the per-point certificates to the ledger (:func:`_record_smoothing`)."""
    lo, hi, size = span
    parts, labels = [], []
    for k, start in enumerate(range(lo, hi, size)):
        stop = min(start + size, hi)
        x, y = (t.x[start:stop], t.y[start:stop]) if stop <= len(t.x) else _decode(t.split, start, stop)
        state = None
        if files is not None:
            files.append(out / (f"smoothing-{k}.pt" if size < hi - lo else "smoothing.pt"))
            key = {"points": digest(x, y), "weights": model_digest(t.model), "first": start} | s.key()
            state = Progress(files[-1], key)
            if state.note and progress:
                print(state.note)
        parts.append(
            smooth_certify(
                t.model,
                x,
                s,
                num_classes=t.num_classes,
                first_index=start,
                device=t.device,
                progress=progress,
                state=state,
            )
        )
        labels.append(y.cpu())
    result, y_all = Certified.cat(parts), torch.cat(labels)
    rep.meta["smoothing"] = smooth_summary(result, y_all, s, str(t.meta.get("dataset", "")))
    rep.certified_points = {"smoothing": (result, y_all, s)}


def _record_smoothing(rep: Report, out: Path) -> None:
    """Randomized smoothing's certificates in the weights' ledgers, as an entry of their own kind (``certified``,
    keyed by σ, n0, n, α), never merged into the empirical best-known entry."""
    if not rep.certified_points or "smoothing" not in rep.certified_points:
        return
    result, y, s = rep.certified_points["smoothing"]
    ok = result.prediction == y
    radius = torch.where(ok, result.radius, torch.full_like(result.radius, -1.0))  # -1: abstained or wrong
    paths = [ledger.weights_ledger(rep.meta["weights_sha256"]), out / "ledger.json"]
    ledger.record_certified(paths, rep.meta, "smoothing", s.key(), s.label(), radius, notes=rep.warnings)


def _verdict_row(label: str, suite: str, kind: str, ok: Tensor, clean: float) -> Row:
    """A row that is only a per-point verdict (no adversarial images): accuracy, Wilson interval, drop from clean."""
    value = float(ok.float().mean()) if len(ok) else float("nan")
    return Row(
        label=label,
        suite=suite,
        kind=kind,
        robust=value,
        ci=wilson_interval(int(ok.sum()), len(ok)),
        acc_drop=acc_drop(clean, value),
        n=len(ok),
        points=ok,
    )


def _add_best_known(rep: Report, out: Path) -> None:
    """Add this evaluation to the weights' ledger (in the cache, and ``out/ledger.json`` beside the report) and its
    best-known row to the report: the row sees every evaluation of these weights, whatever folder it was written to.
    A corrupt ledger is moved aside (said in the report's warnings); one that cannot be written raises LedgerError."""
    rep.meta.setdefault("dataset", "")
    broken = {
        f"{r.label} ({r.suite})": r.points
        for r in rep.rows
        if r.kind in ("attack", "cascade step") and r.points is not None
    } | rep.check_points
    assert rep.clean_points is not None
    sha = rep.meta["weights_sha256"]
    entry = ledger.record(
        [ledger.weights_ledger(sha), out / "ledger.json"], rep.meta, rep.clean_points, broken, notes=rep.warnings
    )
    value, count = ledger.headline(entry, rep.meta["n"])
    ok = torch.tensor([entry["points"][str(i)]["broken_by"] is None for i in range(count)], dtype=torch.bool)
    label = f"best known (ledger: {len(entry['attacks'])} attacks so far)"
    rep.rows.append(_verdict_row(label, "ledger", "best known", ok, rep.clean))
    rep.meta["best_known"] = {
        "robust": value,
        "n": count,
        "attacks": list(entry["attacks"]),
        "broken_by": {
            i: p["broken_by"]
            for i, p in entry["points"].items()
            if int(i) < count and p["broken_by"] not in (None, "clean")
        },
    }
