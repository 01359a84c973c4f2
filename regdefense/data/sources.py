"""Datasets: the embedded default, torchvision sets, and a user's own folders or arrays.

Everything is held in memory as a tensor (uint8 when the source is 8-bit, else float in [0,1]),
laid out N×C×H×W, and served by :class:`BatchLoader`, which yields ``(x, y, index)`` with ``x`` a
float tensor in [0,1] and ``index`` the sample's position in its split (for per-sample state).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from regdefense.base.config import DataConfig
from regdefense.base.errors import DataError, unknown
from regdefense.data.augment import augment_batch, draw_augment
from regdefense.data.registry import DATASETS, SPLIT_SEED, Split, default_eps, spec_of
from regdefense.data.stream import STREAM_ABOVE, FileSplit, scan_folder, scan_shards


class DataWarning(UserWarning):
    """The data loads, but something about it is probably not what the user meant (said out loud, not refused)."""


@dataclass
class Data:
    """A dataset ready for training: train/val/test splits and what the model and attacks need to know."""

    name: str
    train: Split  #: or a regdefense.data.stream.FileSplit (streamed image folders)
    val: Split | None
    test: Split
    num_classes: int
    default_eps: float
    augment: str = "none"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


class BatchLoader:
    """Iterate over a split in batches of ``(x, y, index)``; reshuffled per epoch from ``(seed, epoch)``.

    The permutation depends only on the seed and the epoch, and each batch's augmentation only on
    ``(seed, epoch, batch)``, so a run resumed mid-epoch (``set_epoch(epoch, start=k)``) sees exactly the
    batches an uninterrupted one would have. Under torch.distributed each process yields its slice of every
    global batch (``index`` stays the global dataset index). ``pin`` page-locks CPU batches for
    asynchronous copies to a GPU; a split already on the GPU is indexed there.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: str = "none",
        drop_last: bool = False,
        dist=None,
        pin: bool = False,
    ) -> None:
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.augment, self.drop_last, self.epoch, self.start = augment, drop_last, 0, 0
        self.dist, self.pin = dist, pin

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Serve epoch ``epoch``'s batches, skipping its first ``start`` (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        for i in range(self.start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            params = None
            if self.augment != "none":
                gen = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 100_019 + i)
                params = draw_augment(len(idx), self.augment, gen)
            if self.dist is not None and self.dist.enabled:
                idx = self.dist.shard(idx)
                params = params and tuple(self.dist.shard(p) for p in params)
            x = self.split.floats(idx.to(self.split.x.device))
            if params is not None:
                x = augment_batch(x, *(p.to(x.device) for p in params))
            y = self.split.y[idx.to(self.split.y.device)]
            if self.pin and not x.is_cuda:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y, idx


# --- sources ----------------------------------------------------------------------------------


def _array_to_nchw(x: np.ndarray, where: str) -> Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where}: x must have shape (N,H,W), (N,H,W,C) or (N,C,H,W), got {x.shape}")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: x must be uint8 or float in [0,1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: x contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(
            f"{where}: float pixels must lie in [0,1], found [{lo:g}, {hi:g}]; "
            f"divide 8-bit images by 255 or store them as uint8"
        )
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _npz(path: Path) -> Split:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{path} must hold arrays 'x' and 'y', found {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # an empty file is an EOFError
        size = path.stat().st_size if path.exists() else 0
        raise DataError(f"{path} is not a readable .npz file ({size} bytes): {exc or type(exc).__name__}") from None
    if len(y) == 0 or len(x) == 0:
        raise DataError(f"{path} holds no samples (x of shape {x.shape}, y of shape {y.shape})")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) != len(x):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, found {y.min()}")
    return Split(_array_to_nchw(x, str(path)), torch.from_numpy(y.astype(np.int64)))


def _image_folder(
    root: Path, classes: list[str] | None, size: int | None, skip_corrupt: bool = False
) -> tuple[Split, list[str]]:
    """Decode a folder of class sub-folders into memory; a file that does not decode is named (or, with
    ``data.skip_corrupt``, skipped and counted in a warning), as the streamed path does."""
    from PIL import Image

    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    images, labels, skipped = [], [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"):
                continue
            try:
                with Image.open(f) as opened:
                    img: Image.Image = (
                        opened.convert("L") if opened.mode in ("L", "1", "I;16", "I") else opened.convert("RGB")
                    )
                    if size:
                        img = img.resize((size, size))
                    images.append(np.asarray(img))
            except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
                if not skip_corrupt:
                    raise DataError(
                        f"cannot decode image {f}: {type(exc).__name__}: {str(exc)[:120]}; replace or remove it, "
                        f"or set data.skip_corrupt=true to skip such files"
                    ) from None
                skipped.append(str(f))
                continue
            labels.append(label)
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise DataError(f"{root} has classes {extra} that the training folder does not have")
    if skipped:
        warnings.warn(
            f"{root}: skipped {len(skipped)} image(s) that do not decode (data.skip_corrupt): "
            f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}",
            DataWarning,
            stacklevel=3,
        )
    if not images:
        raise DataError(f"{root} holds no images")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(
            f"images under {root} have different sizes {sorted(shapes)[:3]}...; set data.image_size to resize them"
        )
    rgb = any(im.ndim == 3 for im in images)
    arr = np.stack([np.repeat(im[..., None], 3, -1) if rgb and im.ndim == 2 else im for im in images])
    return Split(_array_to_nchw(arr, str(root)), torch.tensor(labels, dtype=torch.long)), classes


def _folder(path: Path, cfg: DataConfig) -> tuple[Any, Any]:
    """train.npz/test.npz, or train/ with test/ (or val/, ImageNet's name) as image folders or tar shards."""
    if (path / "train.npz").exists() and (path / "test.npz").exists():
        return _npz(path / "train.npz"), _npz(path / "test.npz")
    train_dir = path / "train"
    test_dir = path / "test" if (path / "test").is_dir() else path / "val"
    if train_dir.is_dir() and test_dir.is_dir() and any(train_dir.glob("*.tar")):
        shards = scan_shards(train_dir, cfg.image_size)  # tar shards are always streamed
        return shards, scan_shards(test_dir, shards.size)
    if train_dir.is_dir() and test_dir.is_dir():
        if cfg.stream != "off":
            files, names = scan_folder(train_dir, None, cfg.image_size)
            if cfg.stream == "on" or len(files) * files.channels * files.size**2 > STREAM_ABOVE:
                test_files, _ = scan_folder(test_dir, names, files.size)
                return files, test_files
        train, classes = _image_folder(train_dir, None, cfg.image_size, cfg.skip_corrupt)
        test, _ = _image_folder(test_dir, classes, cfg.image_size, cfg.skip_corrupt)
        return train, test
    raise DataError(
        f"{path} must hold train.npz and test.npz, train/ and test/ (or val/) image folders, or train/ "
        f"and test/ folders of WebDataset tar shards"
    )


def load_data(cfg: DataConfig, seed: int = 0) -> Data:
    """Load the dataset ``cfg.name`` with its held-out validation split."""
    name = cfg.name
    spec = spec_of(name)
    if spec is not None:
        train, test = spec.load(cfg)
    elif os.sep in name or "/" in name or Path(name).exists():
        path = Path(name).expanduser()
        if not path.is_dir():
            raise DataError(f"dataset folder '{name}' does not exist")
        train, test = _folder(path, cfg)
    else:
        raise DataError(unknown("dataset", name, DATASETS.names()) + ", or a folder path")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"dataset '{name}' has an empty train or test split")
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"train images are {tuple(train.shape[1:])} but test images are {tuple(test.shape[1:])}")
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    present = torch.unique(torch.cat([train.y.flatten(), test.y.flatten()]))
    if len(present) < num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        warnings.warn(
            f"dataset '{name}': labels run from 0 to {num_classes - 1}, so the model gets {num_classes} outputs, but "
            f"{len(missing)} of those classes have no image ({shown}); relabel the classes to 0..{len(present) - 1} "
            f"if that is not meant",
            DataWarning,
            stacklevel=2,
        )
    if cfg.limit:
        train = train.subset(torch.arange(min(cfg.limit, len(train))))
    val = None
    n_val = int(round(cfg.val_fraction * len(train)))
    if n_val > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED + 1))
        val, train = train.subset(order[:n_val]), train.subset(order[n_val:])
    augment: str = cfg.augment
    streamed = not isinstance(train, Split)
    if augment == "imagenet" and not streamed:
        raise DataError(
            "data.augment=imagenet needs streamed image folders (data.stream=on); in-memory data takes "
            "none, crop or crop_flip"
        )
    if augment == "auto":
        augment = spec.augment if spec is not None else "none"
    sample = train.sample(64) if isinstance(train, FileSplit) else train.floats(torch.arange(min(len(train), 2048)))
    mean = sample.mean(dim=(0, 2, 3)).tolist()
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return Data(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        default_eps=default_eps(name),
        augment=augment,
        mean=mean,
        std=std,
    )


def check_data(data: Data) -> None:
    """Refuse, before training starts, data the loop would choke on or silently learn nonsense from.

    Checks every split: N×C×H×W images with the same C×H×W as the training split, as many labels as
    images, labels in ``[0, num_classes)``, a non-empty training split, and float pixels finite and in [0,1].
    """
    if data.train is None or len(data.train) == 0:
        raise DataError(f"dataset '{data.name}': the training split is empty")
    shape = tuple(data.train.shape[1:])
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        if split is None:
            continue
        if not isinstance(split, Split):  # streamed: files are checked as they are decoded; labels here
            if len(split.y) and (int(split.y.min()) < 0 or int(split.y.max()) >= data.num_classes):
                raise DataError(f"dataset '{data.name}' {name} split: labels outside [0, {data.num_classes - 1}]")
            continue
        x, y = split.x, split.y
        if x.ndim != 4:
            raise DataError(f"dataset '{data.name}' {name} split: images must be N×C×H×W, got shape {tuple(x.shape)}")
        if tuple(x.shape[1:]) != shape:
            raise DataError(
                f"dataset '{data.name}' {name} split: images are {tuple(x.shape[1:])}, but training images are {shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"dataset '{data.name}' {name} split: {len(x)} images but labels of shape {tuple(y.shape)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"dataset '{data.name}' {name} split: labels must be integers, got {y.dtype}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
            raise DataError(
                f"dataset '{data.name}' {name} split: labels must lie in [0, {data.num_classes - 1}], "
                f"found [{int(y.min())}, {int(y.max())}]"
            )
        if x.is_floating_point() and len(x):
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
                raise DataError(f"dataset '{data.name}' {name} split: image {bad} has NaN or infinite pixels")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise DataError(
                    f"dataset '{data.name}' {name} split: float pixels must lie in [0,1], found [{lo:g}, {hi:g}]"
                )
        elif x.dtype != torch.uint8:
            raise DataError(f"dataset '{data.name}' {name} split: pixels must be uint8 or float, got {x.dtype}")
