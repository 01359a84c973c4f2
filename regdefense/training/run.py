"""A run from start to finish: resolve the config, make the run directory, train, measure, report.

``regdefense train`` and :func:`train` both come here.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import matplotlib
import torch

from regdefense.attacks.adapter import pgd_spec, resolve_attack
from regdefense.attacks.measure import accuracy
from regdefense.base import checkpoint, distributed
from regdefense.base.buffers import human
from regdefense.base.config import RunConfig, unreached
from regdefense.base.errors import UserError
from regdefense.base.files import FolderLock, save_png, why, write_atomic
from regdefense.base.runtime import versions
from regdefense.base.safety import TrainingInterrupted, write_error_log
from regdefense.data.sources import Split
from regdefense.host import tracking
from regdefense.host.defense import declared
from regdefense.training.assembly import load_config
from regdefense.training.loop import Trainer
from regdefense.training.restore import require_for_resume

__all__ = ["RunResult", "check", "cost", "final_table", "load_config", "make_run_dir", "peak_host_bytes", "train"]


@dataclass
class RunResult:
    run_dir: Path
    table: list[dict[str, Any]]
    wall_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    main: bool = True  #: False on the processes other than rank 0 of a torchrun job (they measure nothing)
    cost: dict[str, Any] = field(default_factory=dict)  #: wall time, images/s, peak memory, GPU-hours (see cost())


def _stack_label(cfg: RunConfig) -> str:
    return "+".join(cfg.defenses) or "clean"


#: what a run writes before its first complete checkpoint (a folder holding only these, and ``config.json`` of ours,
#: is a run killed early): the lock, the config, the metrics, an error log, and checkpoints' temporary files
EARLY_FILES = ("config.json", "metrics.jsonl", "error.log", ".lock")
_TEMPORARY = re.compile(r"^\.(config\.json|metrics\.jsonl|(last|best|epoch-\d+)\.pt)\..*\.tmp$")


def _run_folder_state(path: Path) -> str:
    """``new`` (absent or empty), ``run`` (a completed checkpoint), ``unfinished`` (a run of ours killed before its
    first checkpoint was complete: only the files it writes by then, its config.json among them or none at all
    but an error log), or ``foreign`` (anything else: never written into)."""
    if not path.exists():
        return "new"
    if not path.is_dir():
        return "foreign"
    names = {p.name for p in path.iterdir()}
    if not names - {".lock"}:
        return "new"
    if (path / "checkpoints" / "last.pt").is_file():
        return "run"
    extra = {n for n in names - set(EARLY_FILES) if not _TEMPORARY.match(n)}
    if extra - {"checkpoints"}:
        return "foreign"
    if "checkpoints" in extra:
        folder = path / "checkpoints"
        if not folder.is_dir() or any(not _TEMPORARY.match(p.name) for p in folder.iterdir()):
            return "foreign"  # a user's own files in checkpoints/ are never a run killed early
    if "config.json" in names:
        return "unfinished" if _is_our_config(path / "config.json") else "foreign"
    return "unfinished" if names - {".lock"} <= {"error.log"} | {n for n in names if _TEMPORARY.match(n)} else "foreign"


def _is_our_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "resolved" in data and "versions" in data and "train" in data


def _clear_unfinished(path: Path) -> None:
    """Remove what a run killed before its first complete checkpoint left (only the names it writes)."""
    for p in path.iterdir():
        if p.name in EARLY_FILES[:-1] or _TEMPORARY.match(p.name):
            p.unlink()
    folder = path / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink()  # temporary files only (checked by _run_folder_state)
        folder.rmdir()


def make_run_dir(cfg: RunConfig, out: str | Path | None = None, echo: Callable[[str], None] = print) -> Path:
    """Create the run directory, take its lock (held until the process ends or :func:`release_run_dir`) and check
    that it is writable before any training starts.

    ``out`` must be new, empty, or a run of ours that never completed its first checkpoint (cleared and started
    again, and said); a folder holding a run is refused (``--resume`` continues it), and so is any other folder,
    so that a mistyped ``--out`` never writes over a user's files.
    """
    if out is not None:
        if not str(out).strip():
            raise UserError("--out is empty; give the run directory's path, or leave --out out for runs/DATE-STACK")
        path = Path(out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.train.out_dir) / f"{stamp}-{_stack_label(cfg)}"
        n = 1
        while path.exists():
            n += 1
            path = Path(cfg.train.out_dir) / f"{stamp}-{_stack_label(cfg)}-{n}"
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file, not a folder; choose another --out")
        if _run_folder_state(path) == "foreign":  # said before anything is written there, the lock included
            raise UserError(
                f"--out {path} is a folder with other files in it, not a regdefense run; choose a new or empty "
                f"folder (nothing in it was changed)"
            )
        path.mkdir(parents=True, exist_ok=True)
        FolderLock(path, "training").acquire()  # then looked at again: two starts cannot both find it empty
        state = _run_folder_state(path)
        if state == "run":
            release_run_dir(path)
            raise UserError(f"{path} already holds a run; pass --resume {path} to continue it or choose another --out")
        if state == "foreign":
            release_run_dir(path)
            raise UserError(
                f"--out {path} is a folder with other files in it, not a regdefense run; choose a new or empty "
                f"folder (nothing in it was changed)"
            )
        if state == "unfinished":
            echo(f"{path} holds a run stopped before its first complete checkpoint: starting it again")
            _clear_unfinished(path)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the run directory {path}: {why(exc)}; choose another --out") from None
    return path


def release_run_dir(path: Path) -> None:
    """Give up the run directory's lock (the end of a run in a process that goes on, e.g. a sweep or a test)."""
    FolderLock(path).release()


def check_out(out: str | Path) -> str:
    """``train --check --out OUT``: would ``train`` accept OUT? A line saying so; raises UserError when not."""
    path = Path(out)
    existed = path.exists()
    try:
        if not existed:
            path.mkdir(parents=True)
        state = _run_folder_state(path)
        if state == "run":
            raise UserError(f"{path} already holds a run; train --resume {path} continues it")
        if state == "foreign":
            raise UserError(f"--out {path} is a folder with other files in it, not a regdefense run")
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the run directory {path}: {why(exc)}; choose another --out") from None
    finally:
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return f"  out    {path} ({'new' if not existed else state}, writable)"


def locate_resume(target: str | Path) -> tuple[Path, Path]:
    """``RUN_DIR`` (resumes ``checkpoints/last.pt``) or a checkpoint file → (run_dir, checkpoint)."""
    target = Path(target)
    if target.is_dir():
        ckpt = target / "checkpoints" / "last.pt"
        if not ckpt.exists():
            if _run_folder_state(target) == "unfinished":
                raise UserError(
                    f"{target} holds a run stopped before its first complete checkpoint, so there is nothing to "
                    f"resume; start it again with: regdefense train --out {target} (with the same options)"
                )
            raise UserError(f"{target} holds no checkpoints/last.pt to resume from")
        return target, ckpt
    if target.is_file():
        return target.parent.parent, target
    raise UserError(f"nothing to resume at {target}: give a run directory or a checkpoint file")


#: settings a resumed run may change: they do not change what the run trains or measures
RESUME_FREE = (
    "train.epochs",
    "train.progress",
    "train.device",
    "train.log",
    "train.out_dir",
    "train.save_every",
    "data.workers",
    "eval.batch_size",
)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, values in config.items():
        if section == "defense":
            for name, table in (values or {}).items():
                out |= {f"{name}.{k}": v for k, v in (table or {}).items()}
        elif isinstance(values, dict):
            out |= {f"{section}.{k}": v for k, v in values.items()}
        elif section == "defenses":
            out[section] = values
    return out


def resume_edits(trained: dict[str, Any], config: RunConfig, done_epochs: int) -> list[str]:
    """Compare the config a checkpoint was trained with and the one a resume would continue with (the run's
    config.json, perhaps edited, plus ``-o`` overrides). Edits that change what the run trains or measures (the
    threat model, a defense's settings, the optimizer, the data...) are refused: the final table would mix epochs
    trained one way with an evaluation made another. More epochs are allowed where the learning-rate schedule does
    not depend on the run's length, and said with what follows where it does. Returns the allowed changes, one line
    each, to be said."""
    if not trained:
        return []
    before, after = _flat(trained), _flat(config.to_dict())
    changed = {
        k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)
    }

    def show(v: Any) -> str:
        return "default" if v is None else repr(v)

    refused = [f"{k} {show(a)} -> {show(b)}" for k, (a, b) in changed.items() if k not in RESUME_FREE]
    said = [f"{k} {show(a)} -> {show(b)}" for k, (a, b) in changed.items() if k in RESUME_FREE]
    if "train.epochs" in changed:
        old, new = changed["train.epochs"]
        t = config.train
        fixed = t.schedule == "constant" or (t.schedule == "multistep" and all(m >= 1 for m in t.milestones))
        if int(new or 0) < done_epochs:
            refused.append(f"train.epochs {old} -> {new}: {done_epochs} epochs are already trained")
        elif not fixed:
            said = [line for line in said if not line.startswith("train.epochs ")]
            said.append(
                f"train.epochs {old} -> {new}: the {t.schedule} learning-rate schedule keeps the horizon of "
                f"{old} epochs it was built with, so past it the rate does not follow a {new}-epoch "
                f"{t.schedule}; for that, start a new run from these weights (-o train.init=RUN_DIR)"
            )
    if refused:
        raise UserError(
            "cannot resume with these changes, which alter what the run trains or measures: "
            + "; ".join(refused)
            + f". Allowed on resume: {', '.join(RESUME_FREE)} (more epochs only with "
            "a constant or fixed-milestone schedule); put the rest back, or start a new run"
        )
    return said


def write_config(trainer, path: Path) -> None:
    data = trainer.config.to_dict()
    data["resolved"] = {
        "device": str(trainer.device),
        "eps": trainer.eps_full,
        "dataset_classes": trainer.data.num_classes,
        "input_shape": list(trainer.data.input_shape),
        "model": type(trainer.raw_model).__name__,
        "extra": trainer.extra.info if trainer.extra is not None else None,
    }
    data["versions"] = versions()
    write_atomic(path, json.dumps(data, indent=2, default=str), "the run's config")


def final_table(trainer) -> list[dict[str, Any]]:
    """Clean and PGD accuracy on the test split for the last and (if different) the best epoch.

    The PGD here is torchattacks' (through the adapter), not the loop's own, so the number does not
    rest on the same code that trained the model.
    """
    cfg = trainer.config
    steps, eps = cfg.eval.pgd_steps, trainer.eps_full
    attack = resolve_attack(pgd_spec(trainer.norm, eps, steps))
    test = trainer.data.test
    n = min(len(test), cfg.eval.test_samples or len(test))
    idx = trainer.dist.shard(torch.arange(n))  # under torchrun each process attacks its share
    x, y = test.floats(idx), test.y[idx]
    kw = {"batch_size": cfg.eval.batch_size, "device": trainer.device}

    def acc(model, attack=None) -> float:
        correct = torch.tensor([accuracy(model, x, y, attack, **kw) * len(idx)], device=trainer.device)
        return float(trainer.dist.sum_(correct)) / n

    def row(label: str) -> dict[str, Any]:
        model = trainer.eval_model()
        return {
            "model": label,
            "clean": acc(model),
            "robust": acc(model, attack),
            "attack": f"PGD-{steps} ({trainer.norm}, eps={eps:.4g}, torchattacks)",
            "n": n,
        }

    last_epoch = trainer.state.epoch
    rows = [row(f"last (epoch {last_epoch})")]
    best = trainer.state.best_epoch + 1
    best_file = trainer.run_dir / "checkpoints" / "best.pt" if trainer.run_dir else None
    trainer.dist.barrier()  # rank 0 has written best.pt
    if best_file is not None and best_file.exists() and best != last_epoch:
        trainer.restore_state(checkpoint.load(best_file))
        rows.append(row(f"best (epoch {best})"))
    return rows


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss terms and held-out accuracies against epoch, as a PNG."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in sorted(k for k in history[0] if k.startswith("loss_")):
        a.plot(epochs, [h[key] for h in history], label=key[5:])
    a.set(title="training loss terms", xlabel="epoch", ylabel="loss")
    a.legend()
    for key, label in (("val_clean", "clean"), ("val_robust", "PGD")):
        if key in history[0]:
            b.plot(epochs, [100 * h[key] for h in history], marker="o", ms=3, label=label)
    b.set(title="held-out accuracy", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    b.legend()
    fig.tight_layout()
    save_png(fig, path, "the training curves")


def check(
    config: RunConfig | str | None = None, defenses: list[str] | None = None, overrides: list[str] | dict | None = None
) -> str:
    """Everything ``train`` does before the first step (config, data checks, model, stack), as a summary."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, defenses, overrides)
    tracking.check_names(cfg.train.log)  # the trackers the run would refuse, refused here too
    trainer = Trainer(cfg)
    t, data = cfg.train, trainer.data
    params = sum(p.numel() for p in trainer.raw_model.parameters())
    return "\n".join(
        [
            f"ok: {_stack_label(cfg)} on {data.name} would run",
            f"  data   train {len(data.train)}, held-out {len(data.val) if data.val is not None else 0}, "
            f"test {len(data.test)}; "
            f"images {tuple(data.input_shape)}, {data.num_classes} classes",
            f"  model  {type(trainer.raw_model).__name__}, {params:,} parameters"
            + (f"; extra networks: {', '.join(trainer.modules)}" if trainer.modules else ""),
            *(
                [
                    f"  extra  {len(trainer.extra)} samples from {len(trainer.extra.sources)} source(s) "
                    f"({trainer.extra.info['pseudo_labelled']} pseudo-labelled), "
                    f"{cfg.data.extra_fraction:g} of each batch; "
                    f"{len(trainer.train_loader)} batches an epoch"
                ]
                if trainer.extra is not None
                else []
            ),
            f"  threat {cfg.threat.norm} eps={trainer.eps_full:.4g}",
            f"  train  {t.epochs} epochs x {len(trainer.train_loader)} batches of {t.batch_size} on {trainer.device}, "
            f"{t.optimizer} lr={t.lr:g} ({t.schedule})",
            *budget_lines(trainer),
            *memory_lines(trainer),
            *[f"  never  {line}" for line in unreached(cfg)],
        ]
    )


def budget_lines(trainer) -> list[str]:
    """Each defense's attack budget at the full ε (a warm-up ramps ε, and with it the default step, during the run):
    ε, the step size, steps and norm, as the one budget rule of :mod:`regdefense.host.defense` resolves the config."""
    lines = []
    for plugin in trainer.pm.get_plugins():
        resolved = getattr(getattr(plugin, "config", None), "resolved", None)
        if callable(resolved) and hasattr(plugin, "name"):
            values = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in resolved(trainer).items()
            )
            lines.append(f"  budget {plugin.name}: {values}")
    return lines


def memory_lines(trainer) -> list[str]:
    """What the run will hold, before it holds it: weights with their gradients and optimizer state, the training
    split when it is in memory, and every defense's declared per-sample buffers (``memory_needs``) with their place.
    Activations are not counted: they scale with the batch and the attack, and PyTorch decides them at run time."""
    per_param = {"sgd": 3, "adam": 4, "adamw": 4}.get(trainer.config.train.optimizer, 4)  # weight, grad, state(s)
    nets = [trainer.raw_model, *trainer.modules.values()]
    weights = sum(p.numel() * p.element_size() for net in nets for p in net.parameters())
    items = [
        (
            f"networks ({len(nets)}): weights, gradients, {trainer.config.train.optimizer} state",
            weights * per_param,
            str(trainer.device),
        )
    ]
    train = trainer.data.train
    if isinstance(train, Split):
        items.append(("training split, in memory", train.x.element_size() * train.x.nelement(), str(train.x.device)))
    else:
        items.append((f"training split, streamed ({len(train)} files; decoded per batch)", 0, "disk"))
    for plugin in trainer.pm.get_plugins():
        needs = declared(plugin, "memory_needs")
        if needs is not None:
            names = {"device": str(trainer.device), "host": "host memory" if trainer.device.type == "cuda" else "cpu"}
            items += [(label, n, names.get(where, where)) for label, (n, where) in needs(trainer).items()]
    total: dict[str, int] = {}
    for _, n, where in items:
        total[where] = total.get(where, 0) + n
    lines = [f"  memory {label}: {human(n)} ({where})" for label, n, where in items]
    lines.append("  memory total (without activations): " + ", ".join(f"{human(n)} {w}" for w, n in total.items() if n))
    return lines


def train(
    config: RunConfig | str | None = None,
    *,
    defenses: list[str] | None = None,
    overrides: list[str] | dict | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> RunResult:
    """Train a defense stack and measure it.

    :param config: a RunConfig, a TOML run file, or None for the defaults (PGD-AT on the embedded digits).
    :param defenses: the stack, e.g. ``["pgd_at"]`` (overrides the file's ``defenses``).
    :param overrides: ``["train.epochs=5", "pgd_at.steps=7"]`` or ``{"train": {"epochs": 5}}``.
    :param out: the run directory (default: a new one under ``train.out_dir``).
    :param resume: a run directory or checkpoint to continue; the run's saved config is used.
    :return: the run directory, the final table and the wall time.
    """
    started = time.perf_counter()
    dist = distributed.init()  # under torchrun: join the group before anything is written
    echo = echo if dist.is_main else (lambda _msg: None)
    if resume is not None:
        run_dir, ckpt = locate_resume(resume)
        if dist.is_main:  # one writer per run folder: a second train --resume is refused with the holder named
            FolderLock(run_dir, "training").acquire()
        try:
            return _train(run_dir, ckpt, None, overrides, dist, echo, started)
        finally:
            release_run_dir(run_dir)
    cfg = config if isinstance(config, RunConfig) else load_config(config, defenses, overrides)
    tracking.check_names(cfg.train.log)
    run_dir = dist.broadcast_object(make_run_dir(cfg, out, echo) if dist.is_main else None)  # rank 0 names it
    try:
        return _train(run_dir, None, cfg, overrides, dist, echo, started)
    finally:
        release_run_dir(run_dir)


def _train(
    run_dir: Path, ckpt: Path | None, config: RunConfig | None, overrides, dist, echo, started: float
) -> RunResult:
    """The run in its (locked) folder: a new one with ``config``, or a resume from ``ckpt``."""
    if ckpt is not None:
        try:
            saved = json.loads((run_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {run_dir / 'config.json'} to resume: {exc}") from None
        if not isinstance(saved, dict):
            raise UserError(f"{run_dir / 'config.json'} is not a run's config (a JSON {type(saved).__name__})")
        saved = {k: v for k, v in saved.items() if k not in ("versions", "resolved")}
        payload = checkpoint.load(ckpt)
        require_for_resume(list(saved.get("defenses") or []), payload, run_dir)
        cfg = load_config(raw=saved, overrides=overrides)
        for line in resume_edits(payload.get("config") or {}, cfg, int(payload.get("epoch", 0))):
            echo(f"resume: {line}")
        trainer = Trainer(cfg, run_dir=run_dir)
        trainer.resume_from(ckpt)
        echo(f"resuming {run_dir} from {ckpt.name}")
    else:
        assert config is not None
        cfg = config
        try:
            trainer = Trainer(cfg, run_dir=run_dir)
        except Exception as exc:  # refused at start-up: the folder says why (compare lists it with the reason)
            if dist.is_main:
                write_error_log(run_dir, exc)
            raise
        echo(f"run directory: {run_dir}" + (f" ({dist.world} processes)" if dist.enabled else ""))
    trainer.progress.say = echo  # the epoch lines go where the caller's messages go
    if not dist.is_main:  # the other processes train and measure their shares; rank 0 writes
        trainer.fit()
        final_table(trainer)
        return RunResult(run_dir, [], time.perf_counter() - started, trainer.history, main=False)
    write_config(trainer, run_dir / "config.json")
    loggers = tracking.attach(trainer, cfg.train.log)
    try:
        trainer.fit()
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if history:
            plot_curves(history, run_dir / "curves.png")
        trained = trainer.state.epoch  # final_table may load best.pt, whose state is an earlier epoch's
        table = final_table(trainer)
        wall = time.perf_counter() - started
        spent = cost(trainer, history, wall)
        summary = {
            "stack": cfg.defenses,
            "dataset": cfg.data.name,
            "table": table,
            "wall_seconds": wall,
            "epochs": trained,
            "cost": spent,
        }
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2), "the run's summary")
        files = {
            k: run_dir / f
            for k, f in (("curves", "curves.png"), ("summary", "summary.json"), ("metrics", "metrics.jsonl"))
            if (run_dir / f).exists()
        }
        trainer.hook.regdefense_log_summary(trainer=trainer, summary=summary, files=files)
    except TrainingInterrupted:
        raise  # not a failure: last.pt is written and the message says how to resume
    except Exception as exc:  # every failed run keeps why in RUN_DIR/error.log (the message names the defense)
        write_error_log(run_dir, exc)  # over the trainer's: the same failure, with the defense named on top
        raise
    finally:
        tracking.close_all(loggers)  # a failed or interrupted run: the trackers still finish (as failed)
    return RunResult(run_dir, table, wall, history, cost=spent)


def peak_host_bytes() -> int:
    """This process's peak resident memory (VmHWM on Linux; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cost(trainer, history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """What a run cost: wall time, training images per second (global, over the epochs this process ran, from their
    timed loops), peak host memory of this process, peak GPU memory of its device, and GPU-hours (wall × GPUs)."""
    seconds = sum(h.get("epoch_seconds", 0.0) for h in history)
    per_epoch = trainer.epoch_samples  # with data.extra: the original samples and the extra ones mixed in
    gpus = trainer.dist.world if trainer.device.type == "cuda" else 0
    return {
        "wall_seconds": wall,
        "train_images_per_second": len(history) * per_epoch / seconds if seconds else None,
        "peak_host_memory_bytes": peak_host_bytes(),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(trainer.device) if gpus else None,
        "gpus": gpus,
        "gpu_hours": wall * gpus / 3600,
    }
