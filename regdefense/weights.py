"""Model weights in: export folders, ``hf:ORG/NAME`` (through huggingface_hub's cache), ``robustbench:NAME``, run
directories and checkpoints. The writing side (``regdefense export``, ``regdefense push``) sits at the edge of the
package (:mod:`regdefense.export`, :mod:`regdefense.hub`); evaluation, ``--init`` and pseudo-labelling read here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model
from torch import nn

from regdefense import checkpoint
from regdefense.errors import UserError, first_line
from regdefense.models import create_model, default_model, robustbench_zoo

#: what ``regdefense export`` writes; the first two are model folders
FORMATS = ("safetensors", "torchscript", "robustbench")


def architecture(config: dict[str, Any], image_size: int | None = None) -> str:
    """The architecture a run's config built: ``model.name``, or what ``auto`` picked for its data (the image size
    from ``image_size`` or the config's resolved input shape)."""
    name = (config.get("model") or {}).get("name", "auto")
    if name == "auto":
        shape = (config.get("resolved") or {}).get("input_shape")
        size = image_size if image_size is not None else (min(shape[1:]) if shape else None)
        name = default_model((config.get("data") or {}).get("name", "digits"), size)
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
    m = info["config"].get("model") or {}
    c, h, w = info["input_shape"]
    norm = ([0.0] * c, [1.0] * c) if m.get("normalize") else None  # placeholders: the saved buffers replace them
    model = create_model(
        info["architecture"],
        in_channels=c,
        num_classes=info["num_classes"],
        image_size=min(h, w),
        normalize=norm,
        depth=m.get("depth"),
        widen=m.get("widen"),
        input_size=m.get("input_size"),
        activation=m.get("activation"),
        bn_momentum=m.get("bn_momentum"),
    )
    try:
        load_model(model, str(folder / "model.safetensors"))
    except RuntimeError as exc:
        raise UserError(
            f"the weights in {folder} are not a plain '{info['architecture']}' ({info['evaluated_model']} "
            f"of stack {info['stack']}: {first_line(exc, 160)}); load the TorchScript export "
            f"instead (regdefense export RUN --format torchscript)"
        ) from None
    return model.eval()


def parse(target: str) -> tuple[str, str | None]:
    """``hf:ORG/NAME[@REV]`` → (repo id, revision)."""
    spec = target[3:] if target.startswith("hf:") else target
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"'{target}' is not a Hub model: write hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return repo, rev or None


def download(target: str) -> Path:
    """``hf:ORG/NAME[@REV]`` → a local export folder, through huggingface_hub's cache (offline: the cache only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, rev = parse(target)
    try:
        path = Path(
            snapshot_download(
                repo_id, revision=rev, allow_patterns=["config.json", "model.safetensors", "model.ts", "README.md"]
            )
        )
    except LocalEntryNotFoundError:
        raise UserError(
            f"{target} is not in the local Hugging Face cache and the Hub cannot be reached (offline: "
            f"HF_HUB_OFFLINE or no network); download it once online, or copy the cache "
            f"(HF_HUB_CACHE) from a machine that has it"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UserError(f"cannot fetch {target} from the Hub: {first_line(exc, 300)}") from None
    if not (path / "config.json").exists():
        raise UserError(
            f"{target} is not a regdefense export (no config.json); a plain Hub checkpoint loads with "
            f"--arch NAME from its file"
        )
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
        return download(target)
    return target


def read_weights(target: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The model weights of a run directory (its ``best.pt``), a checkpoint, an export folder, ``hf:ORG/NAME`` or
    ``robustbench:NAME``, as ``(where they came from, state_dict)``."""
    if isinstance(target, str) and target.startswith("robustbench:"):
        return target, robustbench_zoo.load(target).state_dict()
    path = Path(resolve(target))
    if is_export(path):
        info = json.loads((path / "config.json").read_text())
        if info["format"] != "safetensors":
            raise UserError(
                f"{target} is a TorchScript export; starting training from it needs its safetensors export "
                f"(regdefense export RUN --format safetensors)"
            )
        return str(target), load_file(str(path / "model.safetensors"))
    ckpt = path / "checkpoints" / "best.pt" if path.is_dir() else path
    return str(ckpt), checkpoint.load(ckpt)["model"]
