"""Run configuration: dataclasses, TOML run files and ``-o section.key=value`` overrides.

A run file looks like::

    defenses = ["pgd_at"]          # the stack, in activation order

    [train]
    epochs = 30
    lr = 0.05

    [defense.pgd_at]
    steps = 10

Every field carries a help string and its limits in ``metadata`` (see :func:`regdefense.base.fields.option`); unknown
sections and keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from regdefense.base.errors import ConfigError, did_you_mean

# the typed-field engine the schema is written in; its names stay importable from here, as before the split
from regdefense.base.fields import MISSING, build, check_limits, coerce, describe, option, replace, safe_eval

__all__ = [
    "MISSING", "SEED_MAX", "DataConfig", "EvalConfig", "ModelConfig", "RunConfig", "ThreatConfig", "TrainConfig",
    "build", "check_limits", "check_linf_eps", "coerce", "describe", "load_toml", "option", "parse_overrides",
    "replace", "resolve", "safe_eval", "unreached",
]  # fmt: skip

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: seeds lie in [0, SEED_MAX]: numpy's generators accept no more (torch's would, up to 2**64 - 1)
SEED_MAX = 2**32 - 1

# --- the core sections ------------------------------------------------------------------------


@dataclass
class TrainConfig:
    epochs: int = option(30, "number of training epochs", ge=1)
    batch_size: int = option(128, "training batch size", ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = option(
        "sgd", "optimizer (adamw: Adam with decoupled weight decay, the large-scale transformer recipes')"
    )
    lr: float = option(0.1, "peak learning rate (with lr_scaling=linear: at a global batch of lr_base_batch)", gt=0)
    lr_scaling: Literal["none", "linear"] = option(
        "none", "linear: scale lr by (batch_size × accumulate) / lr_base_batch (Goyal et al. 2017)"
    )
    lr_base_batch: int = option(256, "the global batch the given lr is meant for (lr_scaling=linear)", ge=1)
    accumulate: int = option(
        1,
        "gradient accumulation: one optimizer step per this many batches of batch_size "
        "(a global batch of batch_size × accumulate that memory could not hold at once)",
        ge=1,
    )
    sync_bn: Literal["auto", "on", "off"] = option(
        "auto",
        "SyncBatchNorm under torchrun: batch statistics over every "
        "process's slice (auto: on with several CUDA processes)",
    )
    momentum: float = option(0.9, "SGD momentum", ge=0, le=1)
    betas: list[float] = option(default_factory=lambda: [0.9, 0.999], help="Adam betas (AToP's code: 0.5, 0.999)")
    nesterov: bool = option(False, "Nesterov momentum (SGD)")
    weight_decay: float = option(5e-4, "L2 weight decay", ge=0)
    schedule: Literal["constant", "multistep", "cosine", "onecycle"] = option("cosine", "learning-rate schedule")
    onecycle_pct: float = option(
        0.3,
        "onecycle: share of the schedule spent rising to lr (PyTorch's pct_start; "
        "Rebuffi et al. / Wang et al.'s 'cosinew': 0.025)",
        gt=0,
        le=0.99,
    )
    milestones: list[float] = option(
        default_factory=lambda: [0.5, 0.75],
        help="multistep: when to decay, in epochs (>= 1) or fractions of training (< 1)",
    )
    gamma: float = option(0.1, "multistep: decay factor", gt=0)
    lr_factors: list[float] | None = option(
        None,
        "multistep: the rate after each milestone as a factor of lr (none: "
        "gamma, gamma², ...); GAIRAT's code: [0.1, 0.01, 0.005]",
    )
    schedule_step: Literal["epoch", "iter"] = option("iter", "step the schedule once per epoch or once per batch")
    warmup_epochs: float = option(
        0.0,
        "learning-rate warm-up over this many epochs, stepped like the schedule (per "
        "batch or per epoch), then the schedule (DYNAT's code: 1 epoch at 0.2x)",
        ge=0,
        epoch="ends",
    )
    warmup: Literal["linear", "constant"] = option(
        "linear", "warm-up shape: linear from warmup_factor·lr to lr, or constant warmup_factor·lr"
    )
    warmup_factor: float = option(
        0.1, "learning-rate factor at the warm-up's start (linear) or during it (constant)", gt=0, le=1
    )
    label_smoothing: float = option(
        0.0,
        "label smoothing of the cross-entropy terms against step.targets (core, "
        "pgd_at, trades, mart's CE, dynat, lbgat's guide, eatr; DYNAT-GAIRAT: 0.2)",
        ge=0,
        le=0.99,
    )
    eps_warmup_epochs: float = option(
        0.0, "ramp ε linearly from 0 to its full value over this many epochs", ge=0, epoch="ends"
    )
    grad_clip: float | None = option(None, "clip the gradient norm to this value (none: no clipping)", gt=0)
    log: list[str] = option(
        default_factory=list,
        help="experiment trackers to log to: tensorboard, wandb, mlflow or an "
        "installed tracker plugin (see docs/ecosystem.md)",
    )
    device: str = option("auto", "'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    amp: Literal["off", "bf16", "fp16"] = option("off", "mixed precision on CUDA (fp16 uses a GradScaler)")
    channels_last: bool | None = option(None, "channels_last memory format (none: on for CUDA)")
    attack_fp32: bool = option(
        False,
        "with train.amp on, run the inner attacks' forwards and losses in fp32 "
        "(slower; for gradients that fp16/bf16 would round away)",
    )
    compile: bool = option(False, "torch.compile the model")
    nonfinite: Literal["stop", "skip"] = option(
        "stop",
        "a NaN/Inf loss term: stop the run naming the epoch, batch "
        "and term, or skip that batch's update and count skips",
    )
    seed: int = option(
        0, "random seed (0 to 2**32 - 1, the range every generator the run seeds accepts)", ge=0, le=SEED_MAX
    )
    init: str = option(
        "",
        "start from these weights: a run directory (its best.pt) or a checkpoint file; "
        "optimizer, schedule and epochs start fresh",
    )
    deterministic: bool = option(False, "use deterministic algorithms only (bit-exact resume)")
    out_dir: str = option("runs", "where run directories are created")
    save_every: int = option(0, "also keep checkpoints/epoch-N.pt every N epochs (0: only last and best)", ge=0)
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        if self.lr_factors is not None and (
            len(self.lr_factors) != len(self.milestones) or min(self.lr_factors, default=1) <= 0
        ):
            raise ConfigError(
                f"train.lr_factors must give one positive factor per milestone ({len(self.milestones)}), "
                f"got {self.lr_factors}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {self.betas}")


@dataclass
class DataConfig:
    name: str = option(
        "digits",
        "dataset: digits (embedded), mnist, fashion_mnist, cifar10, cifar100, svhn, "
        "or a folder with train.npz/test.npz, train/ and test/ image folders, or train/ and test/ "
        "folders of WebDataset tar shards (KEY.jpg + KEY.cls)",
    )
    data_dir: str = option("data", "where torchvision datasets are stored")
    download: bool = option(False, "download torchvision datasets that are missing")
    val_fraction: float = option(0.1, "fraction of the training split held out for per-epoch evaluation", ge=0, le=0.5)
    augment: Literal["auto", "none", "crop", "crop_flip", "imagenet"] = option(
        "auto",
        "training augmentation (auto: crop_flip for CIFAR, crop for SVHN, none otherwise; imagenet: "
        "random-resized crop and flip, streamed image folders only)",
    )
    image_size: int | None = option(
        None,
        "resize image-folder datasets to this size (streamed: resize the shorter side to size/0.875 and centre-crop)",
        ge=1,
    )
    stream: Literal["auto", "on", "off"] = option(
        "auto",
        "image folders: read files lazily in DataLoader workers "
        "instead of decoding everything into memory (auto: when the "
        "decoded images would take over 2 GiB)",
    )
    workers: int = option(2, "streamed data: DataLoader worker processes per training process", ge=0)
    skip_corrupt: bool = option(
        False,
        "image folders: leave out (and count) images that cannot be decoded instead of stopping with the file's name",
    )
    limit: int | None = option(None, "use only the first N training samples (quick experiments)", ge=1)
    extra: list[str] = option(
        default_factory=list,
        help="extra training images mixed into every batch: .npz files "
        "(memory-mapped when uncompressed) or image folders, labelled or "
        "not (see docs/extra-data.md)",
    )
    extra_fraction: float = option(
        0.5,
        "with data.extra: the share of each batch drawn from it (Wang et al. 2023: 0.7; Carmon et al. 2019: 0.5)",
        ge=0,
        le=0.95,
    )
    teacher: str | None = option(
        None,
        "with unlabeled data.extra: the model that pseudo-labels it (a run directory, "
        "checkpoint, export or hf:ORG/NAME)",
    )
    pseudo_min_confidence: float = option(
        0.0,
        "with data.teacher: keep only extra samples whose pseudo-label has at least this softmax confidence",
        ge=0,
        le=1,
    )
    on_device: Literal["auto", "on", "off"] = option(
        "auto", "keep the training split in GPU memory (auto: when it takes under a quarter of the GPU's memory)"
    )


@dataclass
class ModelConfig:
    name: str = option(
        "auto",
        "architecture (see `regdefense models`), or timm:NAME for any timm model; auto picks one for the dataset",
    )
    pretrained: bool = option(
        False, "torchvision and timm architectures: start from ImageNet weights (needs a network, or model.weights)"
    )
    weights: str | None = option(None, "timm architectures: a local weights file to start from (offline pretrained)")
    normalize: bool = option(False, "put the dataset's mean/std normalisation inside the model as buffers")
    depth: int | None = option(None, "wideresnet: depth (e.g. 34)", ge=10)
    widen: int | None = option(None, "wideresnet: widen factor (e.g. 10)", ge=1)
    activation: Literal["relu", "silu"] | None = option(
        None, "wideresnet: activation (none: relu; silu: the Swish WideResNets of Gowal et al. 2020 / Wang et al. 2023)"
    )
    bn_momentum: float | None = option(
        None, "wideresnet: BatchNorm momentum (none: PyTorch's 0.1; Gowal et al.'s Swish WideResNets: 0.01)", gt=0, le=1
    )
    input_size: int | None = option(
        None,
        "torchvision architectures: resize inputs inside the model to this side "
        "(299 for inception_v3, 224 for ImageNet weights); attacks still perturb "
        "the data's own pixels",
        ge=8,
    )


def check_linf_eps(norm: str, eps: float | None, what: str) -> None:
    """Refuse an L∞ budget of 1 or more: images live in [0, 1], so it allows any image at all (ε = 8 meant 8/255)."""
    if norm == "linf" and eps is not None and eps >= 1:
        raise ConfigError(
            f"{what}={eps:g} for L∞ on images in [0, 1] allows any image at all (ε = 1 is the whole box); budgets are "
            f"in [0, 1] pixel units: {eps:g}/255 = {eps / 255:.4f}"
        )


@dataclass
class ThreatConfig:
    norm: Literal["linf", "l2"] = option("linf", "perturbation norm of the threat model")
    eps: float | None = option(None, "perturbation budget in [0,1] pixel units (none: the dataset's default)", ge=0)

    def __post_init__(self) -> None:
        check_linf_eps(self.norm, self.eps, "threat.eps")


@dataclass
class EvalConfig:
    pgd_steps: int = option(20, "PGD steps of the per-epoch and final robustness checks", ge=1)
    val_samples: int | None = option(512, "at most this many held-out samples in the per-epoch check", ge=1)
    test_samples: int | None = option(None, "at most this many test samples in the final table", ge=1)
    batch_size: int = option(256, "evaluation batch size", ge=1)
    co_guard: Literal["auto", "on", "off"] = option(
        "auto",
        "catastrophic-overfitting guard: FGSM vs PGD accuracy on the held-out split each epoch "
        "(auto: on when a single-step defense is active)",
    )
    co_threshold: float = option(
        0.2,
        "flag catastrophic overfitting when FGSM accuracy exceeds PGD accuracy by "
        "more than this (a negative value flags every epoch)",
        ge=-1,
        le=1,
    )
    co_stop: bool = option(False, "stop training when catastrophic overfitting is flagged")
    select: Literal["auto", "robust", "clean"] = option(
        "auto", "held-out metric that picks best.pt (auto: robust when a defense makes adversarial inputs, else clean)"
    )


SECTIONS: dict[str, type] = {
    "train": TrainConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "threat": ThreatConfig,
    "eval": EvalConfig,
}


@dataclass
class RunConfig:
    """Everything a run needs. ``defense`` maps each active defense to its config instance."""

    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    threat: ThreatConfig = field(default_factory=ThreatConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    defenses: list[str] = field(default_factory=lambda: ["pgd_at"])
    defense: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["defenses"] = list(self.defenses)
        out["defense"] = {n: dataclasses.asdict(c) for n, c in self.defense.items()}
        return out


# --- run files and overrides ------------------------------------------------------------------


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML run file, with a clear error for a missing or malformed one."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.epochs=5", "pgd_at.eps=8/255"]`` → ``{"train": {"epochs": "5"}, "pgd_at": {"eps": "8/255"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if key.startswith("defense."):
            key = key[len("defense.") :]
        section, dot, name = key.rpartition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.epochs=5)")
        out.setdefault(section, {})[name] = value.strip()
    return out


def resolve(
    raw: dict[str, Any],
    defenses: list[str] | None,
    overrides: dict[str, dict[str, Any]],
    config_classes: dict[str, type],
) -> RunConfig:
    """Merge a run file's table, the stack and overrides into a validated :class:`RunConfig`.

    :param raw: the parsed TOML (possibly empty).
    :param defenses: the stack given on the command line (replaces the file's ``defenses``), or None.
    :param overrides: from :func:`parse_overrides`.
    :param config_classes: ``{defense name: Config dataclass}`` of the active stack.
    """
    raw = dict(raw)
    allowed = set(SECTIONS) | {"defenses", "defense", "slurm"}  # [slurm]: a sweep's job resources (cluster.py)
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"unknown section '{key}' in the run file{did_you_mean(key, allowed)}; "
                f"valid: {', '.join(sorted(allowed))}"
            )
    for key in list(SECTIONS) + ["defense"]:
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(
                f"'{key}' in the run file must be a table ([{key}] with key = value lines), "
                f"got {type(raw[key]).__name__}"
            )
    for name, table in raw.get("defense", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"'defense.{name}' in the run file must be a table ([defense.{name}]), got {type(table).__name__}"
            )
    stack = list(defenses) if defenses is not None else raw.get("defenses", ["pgd_at"])
    if not isinstance(stack, list) or not all(isinstance(d, str) for d in stack):
        raise ConfigError(f'defenses must be a list of defense names, e.g. defenses = ["pgd_at"], got {stack!r}')
    stack = list(stack)
    sections = {name: dict(raw.get(name, {})) for name in SECTIONS}
    defense_tables = {k: dict(v) for k, v in raw.get("defense", {}).items()}
    for section, values in overrides.items():
        if section in SECTIONS:
            sections[section].update(values)
        elif section in config_classes:
            defense_tables.setdefault(section, {}).update(values)
        else:
            valid = sorted(set(SECTIONS) | set(config_classes))
            raise ConfigError(
                f"unknown section '{section}' in override{did_you_mean(section, valid)}; "
                f"valid: {', '.join(valid)} (a defense's section exists only when it is active)"
            )
    for name in defense_tables:
        if name not in config_classes:
            raise ConfigError(
                f"[defense.{name}] configures a defense that is not in the stack {stack}; "
                f"add --defense {name} or remove the table"
            )
    cfg = RunConfig(**{name: build(cls, sections[name], name) for name, cls in SECTIONS.items()}, defenses=stack)
    cfg.defense = {name: build(cls, defense_tables.get(name, {}), name) for name, cls in config_classes.items()}
    return cfg


def unreached(config: RunConfig) -> list[str]:
    """The settings of a run that its length never reaches, from the fields declared with ``option(epoch=...)``
    (the ``train`` section and every active defense's config): a burn-in that ends after the last epoch (the
    defense never acts), a warm-up that never completes, a period longer than the run. One line each, naming the
    setting, the run's length and what follows."""
    epochs = config.train.epochs
    sections: list[tuple[str, Any]] = [("train", config.train), *config.defense.items()]
    out = []
    for prefix, section in sections:
        if not dataclasses.is_dataclass(section):
            continue
        for f in dataclasses.fields(section):
            kind, value = f.metadata.get("epoch"), getattr(section, f.name)
            if kind is None or value is None or not value:
                continue
            key = f"{prefix}.{f.name}={value:g}"
            if kind == "starts" and value >= epochs:
                who = "the run" if prefix == "train" else f"'{prefix}'"
                out.append(
                    f"{key}: {who} never acts in this {epochs}-epoch run (it starts after epoch {value:g}); "
                    f"train longer or lower it"
                )
            elif kind == "ends" and value > epochs:
                out.append(
                    f"{key}: the ramp never completes in this {epochs}-epoch run (it reaches "
                    f"{epochs / value:.0%} of its end); train longer or shorten it"
                )
            elif kind == "every" and value >= epochs:
                out.append(
                    f"{key}: it never happens in this {epochs}-epoch run (every {value:g} epochs, first after "
                    f"epoch {value:g}); train longer or lower it"
                )
    return out
