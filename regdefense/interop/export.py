"""Export a run's evaluated model to files other tools load: safetensors weights, a ``torch.export`` program, or
(for existing pipelines; torch 2.14 deprecates it) a TorchScript program.

    regdefense export RUN --format safetensors     # RUN/export/model.safetensors + config.json
    regdefense export RUN --format torch-export    # RUN/export/model.pt2 + config.json (torch.export.load)
    regdefense export RUN --format torchscript     # RUN/export/model.ts + config.json (deprecated by torch)

What is exported is what ``regdefense evaluate`` measures (``regdefense_eval_model``: an EMA copy, a purifier in
front of the classifier, ...), in eval mode, taking N×C×H×W float inputs in [0, 1] (any normalisation is inside).
``config.json`` records the architecture, the input shape, the classes, the run's resolved config and the SHA-256 of
the checkpoint it came from. :func:`load` rebuilds any of them (``regdefense.load_model`` too); a ``.pt2`` needs only
``torch.export.load(path).module()`` (the batch dimension is dynamic), a TorchScript export ``torch.jit.load``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from regdefense._version import __version__
from regdefense.attacks.adapter import model_mode
from regdefense.base import checkpoint
from regdefense.base.errors import UserError, first_line
from regdefense.evaluation import ledger
from regdefense.evaluation.targets import load_target
from regdefense.models.weights import FORMATS, architecture, is_export, load, read_weights, resolve

__all__ = ["FORMATS", "export", "is_export", "load", "read_weights", "resolve", "robustbench_info"]


def export(
    run: str | Path, *, fmt: str = "safetensors", out: str | Path | None = None, which: str = "best"
) -> dict[str, Path]:
    """Write the evaluated model of ``run`` (a run directory or checkpoint) in ``fmt``; return the files written."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    if fmt == "robustbench":
        return {"model_info": robustbench_info(run, out=out)}
    t = load_target(run, which=which, n=1, device="cpu")
    ckpt = Path(t.meta["target"])
    config = checkpoint.load(ckpt)["config"]
    folder = Path(out) if out is not None else (t.run_dir or ckpt.parent) / "export"
    folder.mkdir(parents=True, exist_ok=True)
    model = t.model.eval()
    info: dict[str, Any] = {
        "format": fmt,
        "regdefense": __version__,
        "architecture": architecture(config, min(t.x.shape[-2:])),
        "input_shape": list(t.x.shape[1:]),
        "num_classes": t.num_classes,
        "inputs": "float32 in [0, 1], N×C×H×W",
        "evaluated_model": type(model).__name__,
        "stack": t.meta.get("stack", []),
        "dataset": t.meta.get("dataset"),
        "epoch": t.meta.get("epoch"),
        "source": str(ckpt),
        "source_sha256": ledger.fingerprint(ckpt),
        "threat": {"norm": t.norm, "eps": t.default_eps},
        "config": config,
    }
    files = {"config": folder / "config.json"}
    if fmt == "safetensors":
        files["weights"] = folder / "model.safetensors"
        save_model(
            model, str(files["weights"]), metadata={"regdefense": __version__, "architecture": info["architecture"]}
        )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(files["weights"], 0o666 & ~umask)  # safetensors writes 0600; an export is meant to be shared
    elif fmt == "torch-export":
        files["weights"] = folder / "model.pt2"
        batch = torch.export.Dim("batch", max=1 << 20)  # any batch size (min=1 would break the 0/1 rule)
        example = t.x[:1].float().repeat(2, 1, 1, 1)  # two images: a batch of one would fix the batch size
        try:
            with model_mode(model, False):
                program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        except Exception as exc:  # a model torch.export cannot trace (data-dependent control flow, ...)
            raise UserError(
                f"torch.export cannot export this model ({type(model).__name__}): {first_line(exc, 300)}; export "
                f"--format safetensors instead"
            ) from None
        torch.export.save(program, str(files["weights"]))
    else:
        files["weights"] = folder / "model.ts"
        with torch.no_grad(), model_mode(model, False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # said once, below, in our words
            traced = torch.jit.trace(model, t.x[:1], check_trace=False)
            traced.save(str(files["weights"]))
        warnings.warn(
            "TorchScript is deprecated by torch 2.14; --format torch-export writes the same model as a "
            "torch.export program (model.pt2) that evaluation, ART and torch itself load",
            FutureWarning,
            stacklevel=2,
        )
    files["config"].write_text(json.dumps(info, indent=2, default=str))
    return files


def _eps_text(eps: float) -> str:
    """RobustBench writes L∞ budgets as fractions of 255 ("8/255") and L2 budgets as decimals."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and k >= 1 else f"{eps:g}"


def robustbench_info(run: str | Path, *, out: str | Path | None = None, name: str | None = None) -> Path:
    """RobustBench's model-info JSON (the fields of its ``model_info/<dataset>/<threat>/<name>.json`` files) from the
    run's latest ``regdefense evaluate`` report, which must include the ``autoattack`` suite (the official code)."""
    run = Path(run)
    try:
        report = json.loads((run / "eval" / "report.json").read_text())
    except (OSError, ValueError):
        raise UserError(
            f"{run}/eval/report.json is missing: run `regdefense evaluate {run} --attacks autoattack` "
            f"first — RobustBench's model info carries the official AutoAttack accuracy"
        ) from None
    meta = report["meta"]
    rows = [r for r in report["rows"] if r["suite"] == "autoattack" and r["kind"] == "group worst case"]
    if not rows:
        raise UserError(
            f"the report in {run}/eval was made without the autoattack suite; run `regdefense evaluate "
            f"{run} --attacks autoattack` (the official code) first"
        )
    config = json.loads((run / "config.json").read_text())
    threat = "Linf" if meta["norm"] == "linf" else "L2"
    best = meta.get("best_known", {}).get("robust")
    info = {
        "link": "",
        "name": name or run.name,
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": meta.get("dataset", ""),
        "venue": "",
        "architecture": architecture(config),
        "eps": _eps_text(float(meta["eps"])),
        "clean_acc": f"{100 * report['clean']:.2f}",
        "reported": f"{100 * rows[0]['robust']:.2f}",
        "autoattack_acc": f"{100 * rows[0]['robust']:.2f}",
        "footnote": f"regdefense stack {'+'.join(config.get('defenses', [])) or 'clean'}; evaluated on "
        f"{meta['n']} test points"
        + (
            f"; best known over every attack run: {100 * best:.2f}%"
            if best is not None and best < rows[0]["robust"]
            else ""
        ),
    }
    folder = Path(out) if out is not None else run / "export"
    path = folder / "model_info" / str(info["dataset"]) / threat / f"{info['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    return path
