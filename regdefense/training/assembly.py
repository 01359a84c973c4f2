"""The parts of a run, built one way for everyone who needs them: training, evaluation, the ART bridge, ``--check``.

:class:`Assembly` activates the stack, picks the device, seeds, loads (and checks) the data, builds the model (with
``train.init`` weights), collects the defenses' extra networks (``regdefense_add_modules``) and places everything on
its device. The training loop (:class:`regdefense.training.loop.Trainer`) is an Assembly that also has an optimizer,
loaders and a schedule; :func:`regdefense.training.restore.load_model` uses a bare Assembly to rebuild an evaluated
model
without any of those. The order of the steps is the order of random draws, so it never changes.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from regdefense.attacks.adapter import model_mode
from regdefense.base import distributed
from regdefense.base.config import RunConfig, load_toml, parse_overrides, resolve
from regdefense.base.errors import ConfigError, DataError, UserError, first_line
from regdefense.base.runtime import resolve_device, seed_everything
from regdefense.data.registry import spec_of
from regdefense.data.sources import Data, check_data, load_data
from regdefense.host.defense import declared
from regdefense.host.discovery import activate, catalogue, config_classes
from regdefense.models import create_model, default_model
from regdefense.models.weights import read_weights

NORM_NAMES = {"linf": "L∞", "l2": "L2"}

#: builds the extra training data of ``data.extra`` (``regdefense.training.extra.load_extra``) once the data is loaded
ExtraLoader = Callable[[RunConfig, Data, Callable[[str], None]], Any]


def load_config(
    config_file: str | None = None,
    defenses: list[str] | None = None,
    overrides: list[str] | dict[str, dict[str, Any]] | None = None,
    raw: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a run file (or an already parsed table), a stack and overrides into a RunConfig."""
    raw = dict(raw) if raw is not None else (load_toml(config_file) if config_file else {})
    ov = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    stack = list(defenses) if defenses is not None else raw.get("defenses", ["pgd_at"])
    if not isinstance(stack, list) or not all(isinstance(s, str) for s in stack):
        raise ConfigError(f"defenses must be a list of defense names, got {stack!r}")
    if "none" in stack:  # the CLI's --defense none, in every door: plain training
        if stack != ["none"]:
            others = ", ".join(s for s in stack if s != "none")
            raise ConfigError(f"'none' means no defense at all; it cannot be stacked with {others}")
        stack = []
    return resolve(raw, stack, ov, config_classes(stack))


class Assembly:
    """A stack's parts: ``config``, ``pm``/``hook`` (the active defenses), ``dist``, ``device``, ``data``, ``extra``,
    ``raw_model`` (and ``model``, its compiled form under ``train.compile``), ``modules`` (extra networks), and the
    threat model (``eps_full``, ``norm``). Defenses see it as the ``trainer`` argument of the set-up hooks.

    :param pm: an activated plugin manager (default: the config's stack).
    :param data: in-memory data to use instead of ``config.data`` (the ART bridge's arrays).
    :param model: the network to train instead of building ``config.model`` (an ART classifier's module).
    :param extra: the loader of ``data.extra`` (the training loop passes one; evaluation reads no extra data).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        pm: Any = None,
        data: Data | None = None,
        model: nn.Module | None = None,
        extra: ExtraLoader | None = None,
    ) -> None:
        self.config = config
        t = config.train
        self.pm = pm if pm is not None else activate(config.defenses, config.defense)
        self.hook = self.pm.hook
        self.dist = distributed.init("cpu" if t.device == "cpu" else None)
        self.device = resolve_device(t.device, self.dist.local_rank if self.dist.enabled else None)
        self.dist.device, self.dist.batch_size = self.device, t.batch_size
        if t.amp != "off" and self.device.type != "cuda":  # works (CPU autocast), but is rarely faster there
            self.echo(f"note: train.amp={t.amp} on {self.device.type} runs under CPU autocast; it is meant for GPUs")
        seed_everything(t.seed, t.deterministic)
        self.data = data if data is not None else load_data(config.data, t.seed)
        check_data(self.data)
        self.extra = extra(config, self.data, self.echo) if extra is not None else None
        self.eps_full = config.threat.eps if config.threat.eps is not None else self.data.default_eps
        self.norm = config.threat.norm
        for name, plugin in self.pm.list_name_plugin():
            norms = declared(plugin, "norms")
            if self.norm not in norms:
                raise ConfigError(
                    f"{name} is an {' / '.join(NORM_NAMES[n] for n in norms)} defense (its perturbation is defined "
                    f"for that norm only); the run's threat.norm is {self.norm}: use threat.norm={norms[0]}"
                )
        self.eps_factor = 1.0
        #: the loop's position (a Trainer's TrainState; rebuilt models get the checkpoint's epoch)
        self.state: Any = None
        self.raw_model = model if model is not None else self._build_model()
        if t.init:
            self._load_init(t.init)
        self._check_model()
        self.model: Any = self.raw_model  # replaced by its compiled form below when train.compile is set
        self.modules: dict[str, nn.Module] = {}
        for added in self.hook.regdefense_add_modules(trainer=self):
            for name, module in (added or {}).items():
                if name in self.modules:
                    raise UserError(f"two defenses add a module named '{name}'")
                self.modules[name] = module
        if self.sync_bn:  # batch statistics over every process's slice, as one large batch would have them
            self.raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(self.raw_model)
            self.modules = {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in self.modules.items()}
        channels_last = t.channels_last if t.channels_last is not None else self.device.type == "cuda"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for net in [self.raw_model, *self.modules.values()]:
            net.to(self.device, memory_format=fmt)  # type: ignore[call-overload]  # torch's stubs lack this form
            for tensor in [*net.parameters(), *net.buffers()]:
                self.dist.broadcast_(tensor.data)  # every process starts from rank 0's weights
        if self.dist.rank:
            torch.manual_seed(t.seed + 1_000_003 * self.dist.rank)  # but draws its own random starts
        self.model = torch.compile(self.raw_model) if t.compile else self.raw_model

    # --- services for plugins -----------------------------------------------------------------

    @property
    def eps(self) -> float:
        """The run's ε at this point of training (the threat ε times the warm-up ramp)."""
        return self.eps_full * self.eps_factor

    def ramp(self, value: float) -> float:
        """Scale a defense's own ε by the warm-up ramp, as ``trainer.eps`` is."""
        return value * self.eps_factor

    def echo(self, message: str) -> None:
        """Print a message for the user without breaking progress bars (rank 0 only under torchrun)."""
        if self.dist.is_main:
            tqdm.write(message, file=sys.stderr)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of forwards (a no-op unless ``train.amp`` is bf16 or fp16)."""
        amp = self.config.train.amp
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def attack_autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of inner attacks: :meth:`autocast`, or full precision with ``train.attack_fp32``."""
        if self.config.train.attack_fp32:
            return torch.autocast(self.device.type, enabled=False)
        return self.autocast()

    def build_network(self, arch: str) -> nn.Module:
        """A zoo architecture sized for this run's data (channels, classes, image size), for defenses that add
        networks (guides, proxies); ``"auto"`` is the run's own architecture."""
        c, h, w = self.data.input_shape
        if arch == "auto":
            arch = self._auto_model() if self.config.model.name == "auto" else self.config.model.name
        return create_model(arch, in_channels=c, num_classes=self.data.num_classes, image_size=min(h, w))

    def ce(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy against hard labels with the run's ``train.label_smoothing``: the supervised terms of
        the objectives use it, so label smoothing applies to whatever stack is active."""
        return F.cross_entropy(logits, targets, reduction=reduction, label_smoothing=self.config.train.label_smoothing)

    @functools.cached_property
    def roles(self) -> dict[str, dict[str, Any]]:
        """Per active defense: whether it builds the evaluated model (a plain ``regdefense_eval_model``) and where it
        comes from — what evaluating the checkpoint needs installed, and what to tell a user who lacks it."""
        builds = {
            i.plugin_name for i in self.hook.regdefense_eval_model.get_hookimpls() if not (i.wrapper or i.hookwrapper)
        }
        cat = catalogue()
        out = {}
        for name, _ in self.pm.list_name_plugin():
            if name != "core":
                info = cat.get(name)
                out[name] = {
                    "eval_model": name in builds,
                    "dist": info.dist if info else "",
                    "version": info.version if info else "",
                }
        return out

    @functools.cached_property
    def sync_bn(self) -> bool:
        """Whether BatchNorm layers synchronise their statistics across processes (``train.sync_bn``)."""
        mode = self.config.train.sync_bn
        if mode == "off" or not self.dist.enabled:
            return False
        if self.device.type != "cuda":
            if mode == "on":
                raise ConfigError(
                    "train.sync_bn=on needs CUDA processes: torch's SyncBatchNorm runs on GPUs only "
                    "(under torchrun on CPUs each process keeps its own batch statistics; use "
                    "train.sync_bn=auto or off)"
                )
            return False
        return True

    # --- building -----------------------------------------------------------------------------

    def _build_model(self) -> nn.Module:
        m = self.config.model
        c, h, w = self.data.input_shape
        name = self._auto_model() if m.name == "auto" else m.name
        if m.name == "auto" and getattr(spec_of(self.data.name), "model", None) is None:
            self.echo(
                f"model.name=auto: {name} for {c}×{h}×{w} images of '{self.data.name}' (set model.name to choose)"
            )
        norm = (self.data.mean, self.data.std) if m.normalize else None
        return create_model(
            name,
            in_channels=c,
            num_classes=self.data.num_classes,
            image_size=min(h, w),
            pretrained=m.pretrained,
            normalize=norm,
            depth=m.depth,
            widen=m.widen,
            input_size=m.input_size,
            weights=m.weights,
            activation=m.activation,
            bn_momentum=m.bn_momentum,
            dataset=self.data.name,
        )

    def _auto_model(self) -> str:
        _, h, w = self.data.input_shape
        return default_model(self.data.name, min(h, w))

    def _load_init(self, target: str) -> None:
        """Start from other weights: a run's best.pt or a checkpoint file (the paper-001 fine-tuning flow), an export
        folder or ``hf:ORG/NAME`` (its safetensors), or ``robustbench:NAME`` (the zoo model's weights)."""
        source, state = read_weights(target)
        try:
            self.raw_model.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(
                f"train.init: the weights of {source} do not fit this model: "
                f"{first_line(exc, 300)} (the architecture must match: model.name)"
            ) from None

    def _check_model(self) -> None:
        """Run the model on two training images: it must take their shape and return one logit per class."""
        x = self.data.train.floats(torch.arange(min(2, len(self.data.train))))
        first_conv = next((m for m in self.raw_model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None and first_conv.in_channels != x.shape[1]:
            raise DataError(
                f"the model takes {first_conv.in_channels}-channel images but the dataset's have "
                f"{x.shape[1]}; pick a model for this data (model.name=auto) or convert the images"
            )
        try:
            with torch.no_grad(), model_mode(self.raw_model, False):
                out = self.raw_model(x)
        except RuntimeError as exc:
            raise DataError(
                f"the model cannot take this dataset's inputs of shape {tuple(x.shape[1:])}: {first_line(exc)}"
            ) from None
        if out.ndim != 2 or out.shape[1] != self.data.num_classes:
            raise DataError(
                f"the model returns shape {tuple(out.shape)} but the dataset has "
                f"{self.data.num_classes} classes; logits must be (N, {self.data.num_classes})"
            )
