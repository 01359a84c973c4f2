"""Export a run's evaluated model to files other tools load: safetensors weights or a TorchScript program.

    regdefense export RUN --format safetensors     # RUN/export/model.safetensors + config.json
    regdefense export RUN --format torchscript     # RUN/export/model.ts + config.json

What is exported is what ``regdefense evaluate`` measures (``regdefense_eval_model``: an EMA copy, a purifier in
front of the classifier, ...), in eval mode, taking N×C×H×W float inputs in [0, 1] (any normalisation is inside).
``config.json`` records the architecture, the input shape, the classes, the run's resolved config and the SHA-256 of
the checkpoint it came from. :func:`load` rebuilds a safetensors export; a TorchScript export needs only
``torch.jit.load``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regdefense.errors import UserError

FORMATS = ("safetensors", "torchscript", "robustbench")


def export(run: str | Path, *, fmt: str = "safetensors", out: str | Path | None = None,
           which: str = "best") -> dict[str, Path]:
    """Write the evaluated model of ``run`` (a run directory or checkpoint) in ``fmt``; return the files written."""
    from regdefense import __version__, checkpoint, ledger
    from regdefense.attacks import model_mode
    from regdefense.evaluate import load_target

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
        "format": fmt, "regdefense": __version__, "architecture": _architecture(config),
        "input_shape": list(t.x.shape[1:]), "num_classes": t.num_classes, "inputs": "float32 in [0, 1], N×C×H×W",
        "evaluated_model": type(model).__name__, "stack": t.meta.get("stack", []), "dataset": t.meta.get("dataset"),
        "epoch": t.meta.get("epoch"), "source": str(ckpt), "source_sha256": ledger.fingerprint(ckpt),
        "threat": {"norm": t.norm, "eps": t.default_eps}, "config": config}
    files = {"config": folder / "config.json"}
    if fmt == "safetensors":
        from safetensors.torch import save_model

        files["weights"] = folder / "model.safetensors"
        save_model(model, str(files["weights"]), metadata={"regdefense": __version__, "architecture": info["architecture"]})
    else:
        files["weights"] = folder / "model.ts"
        with torch.no_grad(), model_mode(model, False):
            traced = torch.jit.trace(model, t.x[:1], check_trace=False)
        traced.save(str(files["weights"]))
    files["config"].write_text(json.dumps(info, indent=2, default=str))
    return files


def _architecture(config: dict[str, Any]) -> str:
    name = (config.get("model") or {}).get("name", "auto")
    if name == "auto":
        from regdefense.models import default_model

        name = default_model((config.get("data") or {}).get("name", "digits"))
    return name


def load(folder: str | Path) -> nn.Module:
    """Rebuild an export: ``model.ts`` with ``torch.jit.load``, ``model.safetensors`` into its architecture."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} is not a regdefense export (config.json: {exc})") from None
    if info["format"] == "torchscript":
        return torch.jit.load(str(folder / "model.ts"), map_location="cpu").eval()
    from safetensors.torch import load_model

    from regdefense.models import create_model

    m = info["config"].get("model") or {}
    c, h, w = info["input_shape"]
    norm = ([0.0] * c, [1.0] * c) if m.get("normalize") else None  # placeholders: the saved buffers replace them
    model = create_model(info["architecture"], in_channels=c, num_classes=info["num_classes"], image_size=min(h, w),
                         normalize=norm, depth=m.get("depth"), widen=m.get("widen"), input_size=m.get("input_size"),
                         activation=m.get("activation"), bn_momentum=m.get("bn_momentum"))
    try:
        load_model(model, str(folder / "model.safetensors"))
    except RuntimeError as exc:
        raise UserError(f"the weights in {folder} are not a plain '{info['architecture']}' ({info['evaluated_model']} "
                        f"of stack {info['stack']}: {str(exc).splitlines()[0][:160]}); load the TorchScript export "
                        f"instead (regdefense export RUN --format torchscript)") from None
    return model.eval()


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
        raise UserError(f"{run}/eval/report.json is missing: run `regdefense evaluate {run} --attacks autoattack` "
                        f"first — RobustBench's model info carries the official AutoAttack accuracy") from None
    meta = report["meta"]
    rows = [r for r in report["rows"] if r["suite"] == "autoattack" and r["kind"] == "group worst case"]
    if not rows:
        raise UserError(f"the report in {run}/eval was made without the autoattack suite; run `regdefense evaluate "
                        f"{run} --attacks autoattack` (the official code) first")
    config = json.loads((run / "config.json").read_text())
    threat = "Linf" if meta["norm"] == "linf" else "L2"
    best = meta.get("best_known", {}).get("robust")
    info = {"link": "", "name": name or run.name, "authors": "", "additional_data": False,
            "number_forward_passes": 1, "dataset": meta.get("dataset", ""), "venue": "",
            "architecture": _architecture(config), "eps": _eps_text(float(meta["eps"])),
            "clean_acc": f"{100 * report['clean']:.2f}", "reported": f"{100 * rows[0]['robust']:.2f}",
            "autoattack_acc": f"{100 * rows[0]['robust']:.2f}",
            "footnote": f"regdefense stack {'+'.join(config.get('defenses', [])) or 'clean'}; evaluated on "
                        f"{meta['n']} test points" + (f"; best known over every attack run: {100 * best:.2f}%"
                                                       if best is not None and best < rows[0]["robust"] else "")}
    folder = Path(out) if out is not None else run / "export"
    path = folder / "model_info" / str(info["dataset"]) / threat / f"{info['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    return path


def is_export(path: Path) -> bool:
    """A folder written by :func:`export` (safetensors or TorchScript)."""
    try:
        return path.is_dir() and json.loads((path / "config.json").read_text()).get("format") in FORMATS[:2]
    except (OSError, ValueError):
        return False


def resolve(target: str | Path) -> Path | str:
    """``hf:ORG/NAME`` → its local export folder (see :mod:`regdefense.hub`); anything else unchanged."""
    if isinstance(target, str) and target.startswith("hf:"):
        from regdefense.hub import download

        return download(target)
    return target


def read_weights(target: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The model weights of a run directory (its ``best.pt``), a checkpoint, an export folder, ``hf:ORG/NAME`` or
    ``robustbench:NAME``, as ``(where they came from, state_dict)``."""
    from regdefense import checkpoint

    if isinstance(target, str) and target.startswith("robustbench:"):
        from regdefense.models.robustbench_zoo import load as load_zoo

        return target, load_zoo(target).state_dict()
    path = Path(resolve(target))
    if is_export(path):
        info = json.loads((path / "config.json").read_text())
        if info["format"] != "safetensors":
            raise UserError(f"{target} is a TorchScript export; starting training from it needs its safetensors export "
                            f"(regdefense export RUN --format safetensors)")
        from safetensors.torch import load_file

        return str(target), load_file(str(path / "model.safetensors"))
    ckpt = path / "checkpoints" / "best.pt" if path.is_dir() else path
    return str(ckpt), checkpoint.load(ckpt)["model"]
