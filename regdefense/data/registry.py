"""The dataset registry: one entry per named dataset, with everything the rest of the library needs to know of it.

A :class:`DatasetSpec` says how to load a dataset's train and test splits and what it implies: the image shape and
class count (shown by ``regdefense datasets``), the default L∞ budget, the augmentation ``data.augment=auto`` picks
and the architecture ``model.name=auto`` picks. Adding a dataset is one entry: :func:`register_dataset` in code, or a
``DatasetSpec`` under the ``regdefense.datasets`` entry-point group from another package::

    [project.entry-points."regdefense.datasets"]
    tiny_shapes = "my_package.data:TINY_SHAPES"      # a DatasetSpec

A folder path given as the dataset name (``train.npz``/``test.npz``, image folders or WebDataset shards) needs no
entry; :func:`regdefense.data.sources.load_data` reads it by its layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from regdefense.base.config import DataConfig
from regdefense.base.errors import DataError
from regdefense.base.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

SPLIT_SEED = 0  # fixed: the digits test split and every validation split do not depend on the run seed


@dataclass
class Split:
    x: Tensor  #: N×C×H×W, uint8 (0..255) or float (0..1)
    y: Tensor  #: N, int64

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def floats(self, idx: Tensor | None = None) -> Tensor:
        import torch  # this module stays torch-free at import: the CLI lists datasets in its help

        x = self.x if idx is None else self.x[idx]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def subset(self, idx: Tensor) -> "Split":
        return Split(self.x[idx], self.y[idx])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)


Loader = Callable[[DataConfig], "tuple[Split, Split]"]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: how to load it and the defaults it implies."""

    name: str
    load: Loader  #: (data config) → (train, test) splits; may read cfg.data_dir and cfg.download
    shape: tuple[int, int, int]  #: C×H×W of one image
    num_classes: int
    default_eps: float  #: the L∞ budget a run uses when threat.eps is not set, in [0,1] pixel units
    augment: str = "none"  #: what data.augment=auto means here: none, crop or crop_flip
    model: str | None = None  #: what model.name=auto picks; None: by image size (regdefense.models.default_model)
    about: str = ""


DATASETS: Registry[DatasetSpec] = Registry("dataset", "regdefense.datasets", error=DataError, hint=", or a folder path")
#: the budget of a dataset that has no entry (a folder of the user's): CIFAR's
FALLBACK_EPS = 8 / 255


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register a named dataset (a third party may instead point an entry point at its spec)."""
    return DATASETS.register(spec.name, spec)


def spec_of(name: str) -> DatasetSpec | None:
    """The registered entry for ``name``, or None for a folder or an unknown name (no error)."""
    return DATASETS.all().get(name) if "/" not in name else None


def default_eps(name: str) -> float:
    spec = spec_of(name)
    return spec.default_eps if spec else FALLBACK_EPS


# --- the built-in entries ---------------------------------------------------------------------------------


def _digits(_cfg: DataConfig) -> tuple[Split, Split]:
    """scikit-learn's 8×8 handwritten digits (1797 images, 16 grey levels), shipped inside the package."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = 360
    return Split(x[order[n_test:]], y[order[n_test:]]), Split(x[order[:n_test]], y[order[:n_test]])


def _torchvision(name: str) -> Loader:
    """A loader for one of torchvision's datasets, read from ``cfg.data_dir`` (downloaded with ``cfg.download``)."""

    def load_both(cfg: DataConfig) -> tuple[Split, Split]:
        import os

        import numpy as np
        import torch
        import torchvision.datasets as tvd

        root = os.path.expanduser(cfg.data_dir)

        def load(train: bool) -> Split:
            try:
                if name == "svhn":
                    ds = tvd.SVHN(root, split="train" if train else "test", download=cfg.download)
                    return Split(torch.as_tensor(ds.data), torch.as_tensor(ds.labels, dtype=torch.long))
                cls = {
                    "mnist": tvd.MNIST,
                    "fashion_mnist": tvd.FashionMNIST,
                    "cifar10": tvd.CIFAR10,
                    "cifar100": tvd.CIFAR100,
                }[name]
                ds = cls(root, train=train, download=cfg.download)
            except RuntimeError as exc:
                if cfg.download:
                    raise DataError(f"could not download {name} into {root}: {exc}") from None
                raise DataError(
                    f"{name} was not found under '{root}'; pass --download to fetch it (needs a network) "
                    f"or --data-dir to point at a copy"
                ) from None
            except OSError as exc:
                raise DataError(f"could not get {name} into '{root}': {exc}") from None
            data = torch.as_tensor(np.asarray(ds.data))
            data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
            return Split(data.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))

        return load(True), load(False)

    return load_both


for _spec in (
    DatasetSpec(
        "digits",
        _digits,
        (1, 8, 8),
        10,
        0.2,
        model="digits_cnn",
        about="scikit-learn's 8×8 digits, embedded (1437 train / 360 test)",
    ),
    DatasetSpec("mnist", _torchvision("mnist"), (1, 28, 28), 10, 0.3, model="small_cnn", about="torchvision"),
    DatasetSpec(
        "fashion_mnist", _torchvision("fashion_mnist"), (1, 28, 28), 10, 0.1, model="small_cnn", about="torchvision"
    ),
    DatasetSpec("cifar10", _torchvision("cifar10"), (3, 32, 32), 10, 8 / 255, augment="crop_flip", about="torchvision"),
    DatasetSpec(
        "cifar100", _torchvision("cifar100"), (3, 32, 32), 100, 8 / 255, augment="crop_flip", about="torchvision"
    ),
    DatasetSpec("svhn", _torchvision("svhn"), (3, 32, 32), 10, 8 / 255, augment="crop", about="torchvision"),
):
    register_dataset(_spec)
