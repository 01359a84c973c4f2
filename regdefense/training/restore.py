"""The evaluated model back from what a run left: rebuilt from a checkpoint through the model factory and the
defenses' own hooks (``regdefense_add_modules``, ``regdefense_fit_start``, ``regdefense_eval_model``) — no optimizer,
no data loader, no training loop.

    model = load_model("runs/2026...-pgd_at")      # a run directory (its best.pt), a checkpoint file,
    model = load_model("hf:org/name")               # an export folder, hf:ORG/NAME, robustbench:NAME

The model comes back in eval mode, on ``device``, taking [0, 1] inputs: ready for torchattacks, ART or AutoAttack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from regdefense.base import checkpoint
from regdefense.base.config import DataConfig, RunConfig
from regdefense.base.errors import UserError, first_line
from regdefense.data.sources import load_data
from regdefense.host.defense import declared
from regdefense.host.discovery import catalogue
from regdefense.models import create_model, robustbench_zoo
from regdefense.models.weights import is_export, load, load_program, load_torchscript, resolve, state_dict_of
from regdefense.training.assembly import Assembly, load_config


def load_networks(host: Any, payload: dict[str, Any], only: set[str] | None = None) -> None:
    """Load a checkpoint's weights into ``host.raw_model`` and ``host.modules``, and each active defense's saved state
    (``only`` those named, when given)."""
    try:
        host.raw_model.load_state_dict(payload["model"])
        for name, module in host.modules.items():
            module.load_state_dict(payload["modules"][name])
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"the checkpoint does not match this model: {first_line(exc)}") from None
    for name, plugin in host.pm.list_name_plugin():
        load_state = declared(plugin, "load_state_dict")
        if name in payload["plugins"] and load_state is not None and (only is None or name in only):
            load_state(payload["plugins"][name])


def require_for_resume(stack: list[str], payload: dict[str, Any], run_dir: Any) -> None:
    """Refuse to resume a run whose defenses are not all installed, naming each one's distribution and version as the
    checkpoint recorded them (resuming trains: every defense of the stack is needed, not only the evaluated model's)."""
    cat = catalogue()
    missing = [n for n in stack if n not in cat or cat[n].error]
    if not missing:
        return
    roles = payload.get("roles") or {}
    wants = []
    for name in missing:
        role = roles.get(name) or {}
        if role.get("dist"):
            wants.append(
                f"'{name}' from {role['dist']} {role['version']}: pip install '{role['dist']}=={role['version']}'"
            )
        elif name in cat:
            wants.append(f"'{name}' is installed but broken: {cat[name].error}")
        else:
            recorded = ", ".join(f"{d} {v}" for d, v in (payload.get("versions") or {}).items() if d != "torch")
            wants.append(f"'{name}' (not recorded; the run's distributions were: {recorded})")
    raise UserError(
        f"cannot resume {run_dir}: its stack needs defenses that are not installed here — {'; '.join(wants)}; then "
        f"resume again"
    )


def drop_training_only(raw: dict[str, Any], payload: dict[str, Any]) -> list[str]:
    """Remove from a checkpoint's config the defenses that are not installed here but only trained (they do not build
    the evaluated model); refuse, naming the distribution, when one that builds it is missing. Returns the dropped."""
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
            raise UserError(
                f"the run was trained with defense '{name}', which is not installed here; install it "
                f"(the run recorded these distributions: {dists})"
            )
        if role["eval_model"]:
            where = f"{role['dist']} {role['version']}".strip() or "an object passed in Python"
            pip = f": pip install '{role['dist']}=={role['version']}'" if role["dist"] else ""
            raise UserError(
                f"the run was trained with defense '{name}' ({where}), which builds the evaluated model "
                f"(regdefense_eval_model); it is not installed here{pip}"
            )
    raw["defenses"] = [n for n in stack if n not in missing]
    raw["defense"] = {k: v for k, v in (raw.get("defense") or {}).items() if k not in missing}
    return missing


def rebuild(
    payload: dict[str, Any], *, dataset: str | None = None, device: str = "auto"
) -> tuple[Assembly, nn.Module, RunConfig, list[str]]:
    """The parts of the run a checkpoint payload came from, its weights and the states of the defenses that build the
    evaluated model loaded: ``(assembly, evaluated model, config, training-only defenses not installed here)``.

    Only the defenses with a plain ``regdefense_eval_model`` (EMA's average, AToP's purifier in front) get
    ``regdefense_fit_start`` and their saved state; the others only trained the weights, so their set-up (buffers
    sized by the training split, proxies, optimizers) is never built."""
    raw = dict(payload["config"])
    missing = drop_training_only(raw, payload)
    overrides: dict[str, dict[str, Any]] = {
        "train": {"device": device, "progress": False, "compile": False},
        "data": {"extra": [], "teacher": None},
    }  # evaluation reads the test split only: no extra data
    if dataset:
        overrides["data"]["name"] = dataset
    cfg = load_config(raw=raw, overrides=overrides)
    host = Assembly(cfg)
    builders = {
        i.plugin_name
        for i in host.hook.regdefense_eval_model.get_hookimpls()
        if not (i.wrapper or i.hookwrapper) and i.plugin_name != "core"
    }
    others = [p for n, p in host.pm.list_name_plugin() if n not in builders]
    host.pm.subset_hook_caller("regdefense_fit_start", remove_plugins=others)(trainer=host)
    load_networks(host, payload, only=builders)
    host.state = _EvalState(payload["epoch"])
    model = host.hook.regdefense_eval_model(trainer=host)
    return host, model, cfg, missing


class _EvalState:
    """What a defense's eval model may read of the loop's state: the epoch the checkpoint was written at."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch


def checkpoint_file(path: Path, which: str = "best") -> Path:
    """A run directory's ``checkpoints/<which>.pt``, or ``path`` itself."""
    if not path.is_dir():
        return path
    ckpt = path / "checkpoints" / f"{which}.pt"
    if not ckpt.exists():
        raise UserError(f"{path} holds no checkpoints/{which}.pt")
    return ckpt


def load_model(
    target: str | Path,
    *,
    which: str = "best",
    device: str = "cpu",
    dataset: str | None = None,
    arch: str | None = None,
    trust_code: bool = False,
) -> nn.Module:
    """The evaluated model of ``target``, in eval mode on ``device``, ready for torchattacks, ART or AutoAttack (inputs
    N×C×H×W in [0, 1]; any normalisation is inside). ``target`` is any of:

    - a run directory (its ``checkpoints/<which>.pt``) or a regdefense checkpoint;
    - an export folder (``regdefense export``: safetensors, torch-export or TorchScript);
    - ``hf:ORG/NAME[@REV]`` (a pushed run, through the Hugging Face cache) or ``robustbench:NAME`` (the zoo);
    - a ``.pt2`` file (``torch.export``);
    - with ``arch``, a model file: an architecture name for a state_dict or RobustBench-format checkpoint
      (``{"state_dict": ...}``, ``module.`` prefixes removed) sized for ``dataset`` (default digits), or
      ``"torchscript"``.

    ``.pt2`` and TorchScript programs (files, or export folders of those formats) are code, not data: they load only
    with ``trust_code=True``; without it they are refused with a UserError.
    """
    if isinstance(target, str) and target.startswith("robustbench:"):
        return robustbench_zoo.load(target, dataset).to(device).eval()
    path = Path(resolve(target))
    if not path.exists():
        raise UserError(
            f"nothing to load at {path}: give a run directory, a checkpoint, an export folder, "
            f"hf:ORG/NAME, robustbench:NAME, a .pt2 file, or a model file with arch="
        )
    if arch == "torchscript":
        return load_torchscript(path, map_location=device, trust_code=trust_code)
    if arch == "torch-export" or (arch is None and path.suffix == ".pt2" and path.is_file()):
        return load_program(path, trust_code=trust_code).to(device)
    if arch is not None:
        return _model_file(path, arch, dataset or "digits").to(device).eval()
    if is_export(path):
        return load(path, trust_code=trust_code).to(device).eval()
    _, model, _, _ = rebuild(checkpoint.load(checkpoint_file(path, which)), dataset=dataset, device=device)
    return model.eval()


def _model_file(path: Path, arch: str, dataset: str) -> nn.Module:
    """Architecture ``arch`` sized for ``dataset``'s images, with the weights of a state_dict-like file."""
    data = load_data(DataConfig(name=dataset, val_fraction=0.0))
    c, h, w = data.input_shape
    model = create_model(arch, in_channels=c, num_classes=data.num_classes, image_size=min(h, w), dataset=dataset)
    try:
        model.load_state_dict(state_dict_of(checkpoint.read(path)))
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} does not fit architecture '{arch}': {first_line(exc, 300)}") from None
    return model
