"""Model weights in: export folders, ``hf:ORG/NAME`` (through huggingface_hub's cache), ``robustbench:NAME``, run
directories and checkpoints. The writing side (``regdefense export``, ``regdefense push``) sits at the edge of the
package (:mod:`regdefense.interop.export`, :mod:`regdefense.interop.hub`); evaluation, ``--init`` and pseudo-labelling
read here.

Loading is data, not code: weights are read with safetensors or ``torch.load(weights_only=True)``. A ``torch.export``
program (``.pt2``) or a TorchScript file is code — its graph runs whatever ops it holds, and torch 2.14's
``torch.export.load`` unpickles parts of the archive with ``weights_only=False`` — so it is loaded only when the caller
says so: ``trust_code=True`` (``regdefense evaluate --trust-code``), never because a folder's ``config.json`` names
that format, nor because ``--arch`` names it (that says what a file is, not that its code may run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model
from torch import nn

from regdefense.base import checkpoint
from regdefense.base.errors import UserError, first_line
from regdefense.models import create_model, default_model, robustbench_zoo

#: what ``regdefense export`` writes; all but ``robustbench`` are model folders
FORMATS = ("safetensors", "torch-export", "torchscript", "robustbench")
MODEL_FORMATS = FORMATS[:3]
#: the file of each model format inside an export folder
MODEL_FILES = {"safetensors": "model.safetensors", "torch-export": "model.pt2", "torchscript": "model.ts"}


class ExportedModel(nn.Module):
    """A ``torch.export`` program (``model.pt2``) as an ordinary module: attacks take gradients through it, hooks
    attach to it, and ``eval()``/``train()`` — which the program's own module refuses — only set the flag (the
    program was exported in eval mode and stays so)."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode  # not passed down: the exported graph has no train mode
        return self


def state_dict_of(obj: Any) -> Any:
    """The weights inside a checkpoint file as the model zoos save them: a regdefense checkpoint (``model``), a
    RobustBench-format or training-script checkpoint (``state_dict``, ``model_state_dict``, ``net``), or a plain
    state_dict; ``module.`` prefixes that DataParallel leaves are removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def allow_code(path: str | Path, kind: str, trust_code: bool = False) -> None:
    """Refuse to load program ``path`` (``kind``: torch.export or TorchScript) unless the caller trusts code; say so
    on stderr when it is loaded."""
    if not trust_code:
        raise UserError(
            f"{path} is a {kind} program: code that runs when loaded, not data; load it only from a source you "
            f"trust, with --trust-code (regdefense evaluate) or trust_code=True (Python)"
        )
    print(f"note: loading {path}, a {kind} program (code), as trust_code allows", file=sys.stderr)


def load_program(path: str | Path, *, trust_code: bool = False) -> ExportedModel:
    """A ``model.pt2`` written by ``torch.export.save`` (``regdefense export --format torch-export``); refused
    without ``trust_code``: torch 2.14's ``torch.export.load`` has no weights-only mode (it unpickles the archive's
    pickled weights and constants with ``weights_only=False``, and falls back to it for the example inputs)."""
    allow_code(path, "torch.export", trust_code)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many kinds for a file that is not an ExportedProgram
        raise UserError(f"{path} is not a torch.export program (.pt2): {first_line(exc, 200)}") from None
    return ExportedModel(program.module()).eval()


def load_torchscript(path: str | Path, map_location: Any = "cpu", *, trust_code: bool = False) -> nn.Module:
    """A TorchScript file, read for existing exports (torch 2.14 deprecates TorchScript: export new ones with
    ``--format torch-export``); torch's deprecation warning for reading is not repeated on every load. Refused
    without ``trust_code``: its scripted code runs on every forward (it may read and write files)."""
    import warnings

    allow_code(path, "TorchScript", trust_code)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        try:
            return torch.jit.load(str(path), map_location=map_location).eval()
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{path} is not a TorchScript file: {first_line(exc)}") from None


def architecture(config: dict[str, Any], image_size: int | None = None) -> str:
    """The architecture a run's config built: ``model.name``, or what ``auto`` picked for its data (the image size
    from ``image_size`` or the config's resolved input shape)."""
    name = (config.get("model") or {}).get("name", "auto")
    if name == "auto":
        shape = (config.get("resolved") or {}).get("input_shape")
        size = image_size if image_size is not None else (min(shape[1:]) if shape else None)
        name = default_model((config.get("data") or {}).get("name", "digits"), size)
    return name


def _positive_ints(value: Any, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(type(v) is int and v > 0 for v in value)


def export_info(folder: str | Path) -> dict[str, Any]:
    """An export folder's ``config.json``, with the keys loading reads checked: a UserError naming what is missing or
    wrong, never a KeyError."""
    try:
        info = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} is not a regdefense export (config.json: {exc})") from None
    info = info if isinstance(info, dict) else {}
    threat = info.get("threat")
    ok = {
        "format": info.get("format") in MODEL_FORMATS,
        "architecture": isinstance(info.get("architecture"), str),
        "input_shape": _positive_ints(info.get("input_shape"), 3),
        "num_classes": _positive_ints([info.get("num_classes")], 1),
        "threat": isinstance(threat, dict) and "norm" in threat and isinstance(threat.get("eps"), (int, float)),
        "config": isinstance(info.get("config", {}), dict),
    }
    if not all(ok.values()):
        raise UserError(
            f"{folder}/config.json is not a regdefense export's: {', '.join(k for k, v in ok.items() if not v)} "
            f"missing or invalid (format one of {', '.join(MODEL_FORMATS)}, input_shape [C, H, W], num_classes, "
            f"threat {{norm, eps}}); export the run again (regdefense export RUN)"
        )
    return info


def load(folder: str | Path, *, trust_code: bool = False) -> nn.Module:
    """Rebuild an export folder (or ``hf:ORG/NAME``, through the Hugging Face cache): ``model.safetensors`` into its
    architecture; with ``trust_code`` only, ``model.pt2`` with ``torch.export.load`` and ``model.ts`` with
    ``torch.jit.load`` (programs: code, see the module's docstring)."""
    folder = Path(resolve(folder))
    info = export_info(folder)
    if info["format"] == "torchscript":
        return load_torchscript(folder / "model.ts", trust_code=trust_code)
    if info["format"] == "torch-export":
        return load_program(folder / "model.pt2", trust_code=trust_code)
    m = (info.get("config") or {}).get("model") or {}
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
            f"the weights in {folder} are not a plain '{info['architecture']}' ({info.get('evaluated_model')} "
            f"of stack {info.get('stack')}: {first_line(exc, 160)}); load the torch.export export "
            f"instead (regdefense export RUN --format torch-export; evaluate it with --trust-code)"
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
            snapshot_download(repo_id, revision=rev, allow_patterns=["config.json", *MODEL_FILES.values(), "README.md"])
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
        return path.is_dir() and json.loads((path / "config.json").read_text()).get("format") in MODEL_FORMATS
    except (OSError, ValueError):
        return False


def resolve(target: str | Path) -> Path | str:
    """``hf:ORG/NAME`` → its local export folder (see :mod:`regdefense.interop.hub`); anything else unchanged."""
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
        info = export_info(path)
        if info["format"] != "safetensors":
            raise UserError(
                f"{target} is a {info['format']} export; starting training from it needs its safetensors export "
                f"(regdefense export RUN --format safetensors)"
            )
        return str(target), load_file(str(path / "model.safetensors"))
    ckpt = path / "checkpoints" / "best.pt" if path.is_dir() else path
    return str(ckpt), checkpoint.load(ckpt)["model"]
