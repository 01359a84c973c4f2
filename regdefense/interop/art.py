"""ART integration: regdefense stacks as ART trainers, runs as ART classifiers, purifiers as ART preprocessors.

    from regdefense.interop.art import RegDefenseTrainer, to_art_classifier, PurifierPreprocessor

    trainer = RegDefenseTrainer(classifier, defenses=["trades", "awp"], configs={"threat": {"eps": 0.2}})
    trainer.fit(x, y, nb_epochs=10, batch_size=128)       # numpy in, trains natively in torch
    classifier = trainer.get_classifier()                  # the same PyTorchClassifier, now robust

Unlike ART's own trainers, training runs through regdefense's loop on the classifier's module and optimizer
(no numpy round trip per batch), updates BatchNorm statistics, accepts any torch LR scheduler (stepped once per
epoch), works with ``nn.Sequential`` models, and leaves the model in eval mode.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import numpy as np
import torch
from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
from art.defences.trainer.trainer import Trainer as ARTTrainer
from torch import Tensor, nn

from regdefense.base.errors import UserError
from regdefense.data.sources import Data, Split
from regdefense.evaluation.targets import load_target
from regdefense.host.discovery import activate
from regdefense.host.hookspecs import hookimpl
from regdefense.training.assembly import load_config
from regdefense.training.loop import Trainer


class ARTInputAdapter(nn.Module):
    """Maps regdefense's [0, 1] N×C×H×W inputs to what the ART classifier's model expects: the clip range, its layout
    (N×H×W×C for ``channels_first=False``), the classifier's preprocessing defences (in ART's order), then its
    mean/std standardisation."""

    def __init__(
        self,
        model: nn.Module,
        clip: tuple[float, float],
        mean: Any,
        std: Any,
        defences: list,
        channels_first: bool = True,
    ) -> None:
        super().__init__()
        self.channels_first = channels_first
        numpy_only = [type(d).__name__ for d in defences if d.apply_fit and not isinstance(d, PreprocessorPyTorch)]
        if numpy_only:
            raise UserError(
                f"the classifier's preprocessing defence(s) {', '.join(numpy_only)} with apply_fit=True run in numpy "
                f"only; regdefense trains in torch and cannot put them in the training graph. Use their PyTorch "
                f"version where ART has one (e.g. SpatialSmoothingPyTorch) or set apply_fit=False (they still apply "
                f"at prediction)"
            )
        self.model, self.defences = model, [d for d in defences if d.apply_fit]
        self.lo, self.hi = float(clip[0]), float(clip[1])
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)))

    def _shape(self, t: Any, x: Tensor) -> Tensor:
        axis = 1 if self.channels_first else x.dim() - 1
        if t.dim() == 1 and t.numel() == x.shape[axis] and t.numel() > 1:
            shape = [1] * x.dim()
            shape[axis] = -1
            return t.view(*shape)
        return t

    def forward(self, x: Tensor) -> Tensor:
        x = x * (self.hi - self.lo) + self.lo
        if not self.channels_first:
            x = x.permute(0, 2, 3, 1)  # the loop's N×C×H×W back to the classifier's N×H×W×C
        for d in self.defences:
            x, _ = d.forward(x)
        x = (x - self._shape(self.mean, x)) / self._shape(self.std, x)
        return self.model(x)


#: configs["train"] keys the classifier's own optimizer decides
OPTIMIZER_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "nesterov", "betas", "lr_scaling")


def _refuse_unknown(kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise UserError(
            f"RegDefenseTrainer.fit does not take {', '.join(sorted(kwargs))} (it would be ignored); "
            f"training settings go in configs, e.g. configs={{'train': {{...}}, 'threat': {{...}}}}"
        )


def _labels(y: Any, nb_classes: int) -> torch.Tensor:
    """Class indices from any label form ART users pass: indices ``(N,)``, indices ``(N, 1)`` or one-hot
    ``(N, nb_classes)``. Anything else is refused with what was found: a one-hot width other than the classifier's
    classes, soft labels (they would be silently reduced to their arg-max), indices that are not whole numbers or lie
    outside ``0 .. nb_classes - 1``."""
    a = np.asarray(y)
    if a.ndim == 2 and a.shape[1] == 1:  # ART's index form (N, 1): not a width-1 one-hot (argmax would be all 0)
        a = a[:, 0]
    if a.ndim == 2:
        if a.shape[1] != nb_classes:
            raise UserError(
                f"labels of shape {a.shape} do not fit a {nb_classes}-class classifier: give class "
                f"indices (N,) or (N, 1), or one-hot (N, {nb_classes})"
            )
        if not (np.isin(a, (0, 1)).all() and (a.sum(axis=1) == 1).all()):
            raise UserError(
                f"labels of shape {a.shape} are not one-hot (each row one 1, the rest 0): soft labels "
                f"would be reduced to their arg-max; give class indices or one-hot labels"
            )
        return torch.as_tensor(a.argmax(axis=1), dtype=torch.long)
    if a.ndim != 1:
        raise UserError(f"labels of shape {a.shape}: give class indices (N,) or (N, 1), or one-hot (N, {nb_classes})")
    if a.size and (not np.issubdtype(a.dtype, np.number) or (a != np.round(a)).any()):
        raise UserError(f"labels must be whole class indices, found {a[:5].tolist()}...")
    if a.size and (a.min() < 0 or a.max() >= nb_classes):
        raise UserError(
            f"labels run from {int(a.min())} to {int(a.max())} but the classifier has {nb_classes} "
            f"classes (0 .. {nb_classes - 1})"
        )
    return torch.as_tensor(a.astype(np.int64), dtype=torch.long)


class _GeneratorLoader:
    """Batches from an ART DataGenerator, as the loop's loader: ``(x, y, position)``."""

    def __init__(self, generator, to01, nb_classes: int) -> None:
        self.generator, self.to01, self.nb_classes = generator, to01, nb_classes
        self.size = generator.size  #: samples an epoch covers (the trainer's train_size)
        self.batches = math.ceil(generator.size / generator.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        pass  # the generator serves its own order; a mid-epoch resume cannot replay it

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        seen = 0
        for _ in range(self.batches):
            x, y = self.generator.get_batch()
            x = self.to01(x)
            yield x, _labels(y, self.nb_classes), torch.arange(seen, seen + len(x))
            seen += len(x)


class RegDefenseTrainer(ARTTrainer):
    """An ``art.defences.trainer.Trainer`` that trains a ``PyTorchClassifier`` with a regdefense stack.

    :param classifier: an ART ``PyTorchClassifier`` (its ``model``, ``optimizer``, ``clip_values``,
        ``preprocessing`` and ``preprocessing_defences`` are honoured; the optimizer is the one that steps).
    :param defenses: the stack, e.g. ``["pgd_at"]`` or ``["trades", "awp", "dynat"]``.
    :param configs: ``{section_or_defense: {key: value}}``, e.g. ``{"threat": {"eps": 0.3}, "pgd_at": {"steps": 7}}``;
        ε is in units of the clip range (inputs are rescaled to [0, 1] inside).
    """

    def __init__(
        self,
        classifier,
        defenses: list[str] | None = None,
        configs: dict[str, dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(classifier)
        self.defenses = list(defenses if defenses is not None else ["pgd_at"])
        self.configs = {k: dict(v) for k, v in (configs or {}).items()}
        self.seed = seed
        clip = classifier.clip_values if classifier.clip_values is not None else (0.0, 1.0)
        self.lo, self.hi = float(np.min(clip[0])), float(np.max(clip[1]))
        prep = classifier.preprocessing
        mean, std = (prep.mean, prep.std) if prep is not None and hasattr(prep, "mean") else (0.0, 1.0)
        self.given_clip = classifier.clip_values is not None
        self.channels_first = bool(getattr(classifier, "channels_first", True))
        self.module = ARTInputAdapter(
            classifier.model,
            (self.lo, self.hi),
            mean,
            std,
            list(classifier.preprocessing_defences or []),
            channels_first=self.channels_first,
        )
        self.trainer = None
        self.fits = 0  #: fit calls so far (each draws its randomness from seed + fits, the user's RNGs untouched)
        opt = classifier.optimizer
        #: the learning rates each fit starts its schedule from: the optimizer's own (a rate the user sets between
        #: fits is taken as the new one; the rate a finished schedule left behind is not)
        self.base_lrs = [g["lr"] for g in opt.param_groups] if opt is not None else []
        self.left_lrs: list[float] = []  #: the rates the last fit's schedule left in the optimizer

    def _to01(self, x: np.ndarray) -> torch.Tensor:
        """The classifier's inputs as the loop's N×C×H×W in [0, 1]; inputs outside the clip range are refused with
        the numbers (they used to be clamped silently: [0, 255] data without clip_values became black and white)."""
        t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        lo, hi = float(t.min()), float(t.max())
        if lo < self.lo - 1e-6 or hi > self.hi + 1e-6:
            where = "its clip_values" if self.given_clip else "[0, 1] (the classifier has no clip_values)"
            raise UserError(
                f"inputs span [{lo:g}, {hi:g}], outside {where} = [{self.lo:g}, {self.hi:g}]; give the classifier the "
                f"clip_values of its data (e.g. (0, 255)): ε and the box of the attacks are in those units"
            )
        if not self.channels_first:
            if t.dim() != 4:
                raise UserError(f"channels_first=False expects N×H×W×C inputs, got shape {tuple(t.shape)}")
            t = t.permute(0, 3, 1, 2).contiguous()
        return ((t - self.lo) / (self.hi - self.lo)).clamp(0, 1)  # float slack within the checked range

    def _train_section(self, nb_epochs: int, batch_size: int) -> dict[str, Any]:
        """The rule for ``configs["train"]``: ART's ``fit`` arguments and the classifier's optimizer and loss win;
        configs fill the rest. A configs key they decide is refused (it would never act), never silently dropped."""
        given = dict(self.configs.get("train", {}))
        for key, fit_value in (("epochs", nb_epochs), ("batch_size", batch_size)):
            if key in given and given[key] != fit_value:
                arg = "nb_epochs" if key == "epochs" else key
                raise UserError(
                    f"configs['train']['{key}']={given[key]} conflicts with fit({arg}={fit_value}): ART's "
                    f"fit arguments decide; drop it from configs"
                )
        opt = self.classifier.optimizer
        owned = [k for k in OPTIMIZER_KEYS if k in given] if opt is not None else []
        if owned:
            raise UserError(
                f"configs['train'] {', '.join(owned)} would never act: the classifier's own optimizer "
                f"({type(opt).__name__}, lr {opt.param_groups[0]['lr']:g}) is the one that steps; set "
                f"them on it (or give the classifier no optimizer and regdefense builds one from configs)"
            )
        loss = getattr(self.classifier, "_loss", None)
        smoothing = 0.0
        if loss is not None:
            if not isinstance(loss, nn.CrossEntropyLoss) or loss.weight is not None or loss.reduction != "mean":
                raise UserError(
                    f"the classifier's loss {loss!r} is not used by regdefense's objectives (each defense "
                    f"computes its own, on cross-entropy); give the classifier nn.CrossEntropyLoss()"
                )
            smoothing = float(loss.label_smoothing)
        if "label_smoothing" in given and smoothing and given["label_smoothing"] != smoothing:
            raise UserError(
                f"configs['train']['label_smoothing']={given['label_smoothing']} conflicts with the "
                f"classifier's CrossEntropyLoss(label_smoothing={smoothing:g})"
            )
        train: dict[str, Any] = {"schedule": "constant", "label_smoothing": smoothing} | given
        return train | {
            "epochs": nb_epochs,
            "batch_size": batch_size,
            "progress": False,
            "seed": self.seed + self.fits,
            "device": str(self.classifier.device),
        }

    def _build(
        self,
        x01: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        nb_epochs: int,
        loader: Any = None,
        val: Split | None = None,
    ):
        sections: dict[str, dict[str, Any]] = {"data": {"val_fraction": 0.0}}
        for key, values in self.configs.items():
            sections.setdefault(key, {}).update(values)
        sections["train"] = self._train_section(nb_epochs, batch_size)
        cfg = load_config(defenses=self.defenses, overrides=sections)
        split = Split(x01, y)
        data = Data(
            name="art",
            train=split,
            val=val,
            test=Split(x01[:2], y[:2]),
            num_classes=self.classifier.nb_classes,
            default_eps=8 / 255,
        )
        trainer = Trainer(
            cfg,
            pm=activate(cfg.defenses, cfg.defense),
            data=data,
            model=self.module,
            optimizer=self.classifier.optimizer,
            loader=loader,
        )
        return trainer

    def _fit(self, trainer, nb_epochs: int, scheduler) -> None:
        if scheduler is not None:

            class _Step:
                name = "art_scheduler"

                @hookimpl
                def regdefense_epoch_end(self):
                    scheduler.step()

            trainer.pm.register(_Step(), name="art_scheduler")
        trainer.config.train.epochs = trainer.state.epoch + nb_epochs
        try:
            trainer.fit()
        finally:
            self.classifier.model.eval()
            self.fits += 1
            for group in trainer.optimizer.param_groups:  # a torch scheduler's bookkeeping, not the user's setting
                group.pop("initial_lr", None)
            if self.classifier.optimizer is not None:
                self.left_lrs = [g["lr"] for g in self.classifier.optimizer.param_groups]
        self.trainer = trainer

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        nb_epochs: int = 20,
        batch_size: int = 128,
        scheduler=None,
        validation_data: tuple[np.ndarray, np.ndarray] | None = None,
        **kwargs,
    ) -> None:
        """Train on numpy arrays (``x`` in the classifier's clip range, ``y`` indices or one-hot).

        ``validation_data=(x_val, y_val)`` is the held-out split of the per-epoch clean/PGD check (``history``).
        Every fit starts from the learning rates the classifier's optimizer came with, and draws its randomness from
        ``seed`` plus the number of earlier fits without touching the caller's global random generators."""
        _refuse_unknown(kwargs)
        if len(x) != len(y):
            raise UserError(f"x has {len(x)} samples but y has {len(y)}")
        val = None
        if validation_data is not None:
            xv, yv = validation_data
            val = Split(self._to01(xv), _labels(yv, self.classifier.nb_classes))
        with self._fresh():
            trainer = self._build(self._to01(x), _labels(y, self.classifier.nb_classes), batch_size, nb_epochs, val=val)
            self._fit(trainer, nb_epochs, scheduler)

    @contextlib.contextmanager
    def _fresh(self):
        """The user's optimizer at its own learning rates (a finished cosine left it at 0), and the caller's random
        generators as they were before the fit (the loop seeds its own)."""
        opt = self.classifier.optimizer
        if opt is not None:
            now = [g["lr"] for g in opt.param_groups]
            if now != self.left_lrs:  # first fit, or the user set new rates since: those are the rates to start from
                self.base_lrs = now
            for group, lr in zip(opt.param_groups, self.base_lrs):
                group["lr"] = lr
        state = (random.getstate(), np.random.get_state())
        with torch.random.fork_rng(devices=[]):
            try:
                yield
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last fit's per-epoch metrics (loss terms; held-out clean/PGD with ``validation_data``)."""
        return self.trainer.history if self.trainer is not None else []

    def fit_generator(self, generator, nb_epochs: int = 20, scheduler=None, **kwargs) -> None:
        """Train from an ART ``DataGenerator`` (``get_batch()`` called ⌈size / batch_size⌉ times per epoch).

        Per-sample state (``fgsm_pgk``) is indexed by position in the epoch, not by dataset index.
        """
        _refuse_unknown(kwargs)
        with self._fresh():
            x0, y0 = generator.get_batch()
            trainer = self._build(
                self._to01(x0),
                _labels(y0, self.classifier.nb_classes),
                generator.batch_size,
                nb_epochs,
                loader=_GeneratorLoader(generator, self._to01, self.classifier.nb_classes),
            )
            self._fit(trainer, nb_epochs, scheduler)

    def predict(self, x: np.ndarray, **kwargs) -> np.ndarray:
        return self.classifier.predict(x, **kwargs)


def to_art_classifier(
    run_or_model,
    *,
    input_shape: tuple[int, ...] | None = None,
    nb_classes: int | None = None,
    which: str = "best",
    lr: float = 1e-3,
    trust_code: bool = False,
):
    """A ``PyTorchClassifier`` (clip values (0, 1), CE loss, an Adam optimizer) from a run directory, a checkpoint,
    an export folder, ``hf:ORG/NAME``, or a trained ``nn.Module`` (then give ``input_shape`` and ``nb_classes``).
    ``.pt2`` and TorchScript programs are code: loaded only with ``trust_code=True``."""
    from art.estimators.classification import PyTorchClassifier

    if isinstance(run_or_model, nn.Module):
        if input_shape is None or nb_classes is None:
            raise UserError("to_art_classifier(model) needs input_shape and nb_classes")
        model = run_or_model
    else:
        t = load_target(run_or_model, which=which, trust_code=trust_code)
        model, input_shape, nb_classes = t.model, tuple(t.x.shape[1:]), t.num_classes
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr) if params else None
    device = next(model.parameters()).device
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=nb_classes,
        optimizer=optimizer,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


class PurifierPreprocessor(PreprocessorPyTorch):
    """AToP's purifier with its random transform as an ART preprocessing defence (inputs in [0, 1]).

    Gradients flow through it (full-gradient attacks); it is applied at prediction and not at fit time.
    """

    def __init__(
        self, purified: nn.Module, device_type: str = "cpu", apply_fit: bool = False, apply_predict: bool = True
    ) -> None:
        super().__init__(device_type=device_type, is_fitted=True, apply_fit=apply_fit, apply_predict=apply_predict)
        self.purified = purified.to(self._device).eval()

    @classmethod
    def from_run(cls, run: str, which: str = "best", device_type: str = "cpu") -> "PurifierPreprocessor":
        model = load_target(run, which=which, n=1).model
        if not hasattr(model, "purified"):
            raise UserError(f"{run} is not an atop run (its evaluated model has no purifier)")
        return cls(getattr(model, "purified"), device_type=device_type)

    def forward(self, x: Tensor, y: Any = None) -> tuple[Tensor, Any]:
        return self.purified(x), y
