"""Streamed image folders: files read lazily, decoded and augmented in DataLoader workers.

``data.stream = on`` (or ``auto`` when a folder's decoded images would take more than ``STREAM_ABOVE`` bytes) keeps
only file names and labels in memory. :class:`FileSplit` stands where an in-memory
:class:`~regdefense.data.sources.Split`
does; :class:`StreamLoader` serves it with the :class:`~regdefense.data.sources.BatchLoader` contract:

- the order of epoch ``e`` is the permutation drawn from ``(seed, e)``, and every random choice of a sample's
  augmentation is seeded by ``(seed, e, index)`` and of a batch's by ``(seed, e, batch)``, so what a worker computes
  does not depend on which worker computes it, and a run resumed at batch ``k`` (``set_epoch(e, start=k)``) sees
  exactly what an uninterrupted one would have: the position in the order is the whole state;
- under torchrun each process reads only its slice of every global batch; ``index`` stays the global dataset index,
  so per-sample buffers (FGSM-PGK) keep working;
- a file that cannot be decoded is named in a ``DataError``; with ``data.skip_corrupt`` it is left out of its batch
  and counted (``skipped_images`` in the epoch's metrics).

Transforms: ``data.augment = imagenet`` is the standard ImageNet training pipeline (random-resized crop, scale
0.08–1, and a horizontal flip); every image is otherwise resized (shorter side to size/0.875) and centre-cropped to
``data.image_size`` — ImageNet's test pipeline. ``crop`` and ``crop_flip`` act on whole batches as in memory.
Normalisation stays inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from regdefense.base.errors import DataError
from regdefense.data.augment import augment_batch, draw_augment

STREAM_ABOVE = 2 << 30  #: data.stream=auto streams a folder whose decoded images would exceed 2 GiB
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63)
    return s


def _open(source):
    """A PIL image from a file path, or from ``(shard, offset, size, name)``: one member of a tar shard."""
    import io

    from PIL import Image

    if isinstance(source, str):
        return Image.open(source)
    shard, offset, size, _ = source
    with open(shard, "rb") as fh:
        fh.seek(offset)
        return Image.open(io.BytesIO(fh.read(size)))


def _probe(sources: list, size: int | None, where) -> tuple[int, int]:
    """Channels and side from the first decodable of the first few images (a corrupt first file is not fatal)."""
    from PIL import UnidentifiedImageError

    for src in sources[:32]:
        try:
            with _open(src) as img:
                return (1 if img.mode in ("L", "1", "I;16", "I") else 3), size or min(img.size)
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError):
            continue
    raise DataError(f"none of the first {min(len(sources), 32)} images under {where} can be decoded")


def _name(source) -> str:
    return source if isinstance(source, str) else f"{source[0]}:{source[3]}"


@dataclass
class FileSplit:
    """A split as image sources and labels; images are decoded only when asked for. A source is a file path or a
    member of a WebDataset tar shard, ``(shard, offset, size, member name)``."""

    files: list
    y: Tensor
    size: int
    channels: int

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.channels, self.size, self.size)

    def subset(self, idx: Tensor) -> "FileSplit":
        return FileSplit([self.files[i] for i in idx.tolist()], self.y[idx], self.size, self.channels)

    def read(self, i: int, augment: str = "none", seed: int | None = None) -> Tensor:
        """Image ``i`` as a C×S×S uint8 tensor (raises DataError naming the file when it cannot be decoded)."""
        from PIL import UnidentifiedImageError
        from torchvision.transforms import v2

        try:
            with _open(self.files[i]) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
            raise DataError(
                f"cannot decode image {_name(self.files[i])}: {type(exc).__name__}: {str(exc)[:120]}; "
                f"replace or remove "
                f"it, or set data.skip_corrupt=true to leave such files out (they are counted)"
            ) from None
        if augment == "imagenet":
            if seed is not None:
                torch.manual_seed(seed)
            img = v2.RandomHorizontalFlip()(v2.RandomResizedCrop(self.size, scale=(0.08, 1.0), antialias=True)(img))
        else:
            img = v2.CenterCrop(self.size)(
                v2.Resize(round(self.size / 0.875) if min(img.size) != self.size else self.size, antialias=True)(img)
            )
        arr = np.asarray(img)
        return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())

    def floats(self, idx: Tensor | None = None) -> Tensor:
        """Decode (with the test transform, in this process) the images ``idx`` (default: all) as floats in [0,1]."""
        ids = range(len(self)) if idx is None else idx.tolist()
        if not len(ids):
            return torch.zeros(0, self.channels, self.size, self.size)
        return torch.stack([self.read(i) for i in ids]).float().div_(255.0)

    def sample(self, n: int) -> Tensor:
        """Up to ``n`` of the first images as floats, leaving out files that cannot be decoded (for statistics)."""
        out = []
        for i in range(min(n, len(self))):
            try:
                out.append(self.read(i))
            except DataError:
                continue
        return torch.stack(out).float().div_(255.0) if out else torch.zeros(1, self.channels, self.size, self.size)


def scan_folder(root: Path, classes: list[str] | None, size: int | None) -> tuple[FileSplit, list[str]]:
    """List ``root/<class>/<image>`` without decoding (one image is opened to learn the channels and, when
    ``size`` is not given, the size)."""
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    files, labels = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        if folder.is_dir():
            names = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            files += [str(f) for f in names]
            labels += [label] * len(names)
    if not files:
        raise DataError(f"{root} holds no images")
    channels, size = _probe(files, size, root)
    return FileSplit(files, torch.tensor(labels, dtype=torch.long), size, channels), classes


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: a member's key is its path up to the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def scan_shards(root: Path, size: int | None) -> FileSplit:
    """Index the WebDataset tar shards ``root/*.tar`` (each sample: ``KEY.jpg|png|...`` and ``KEY.cls``, the label
    as text) by reading their headers and labels once; images stay in the shards and are read by offset, so any
    sample is reachable by its global index — the exact, resumable (seed, epoch) order of image folders."""
    import tarfile

    shards = sorted(root.glob("*.tar"))
    files, labels = [], []
    for shard in shards:
        images, classes = {}, {}
        try:
            with tarfile.open(shard) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if "." + ext.lower() in IMAGE_SUFFIXES:
                        images[key] = (str(shard), m.offset_data, m.size, m.name)
                    elif ext in ("cls", "label"):
                        member = tf.extractfile(m)
                        if member is not None:
                            classes[key] = member.read()
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{shard} is not a readable tar shard: {exc}") from None
        for key, src in images.items():
            if key not in classes:
                raise DataError(f"{shard}: sample '{key}' has an image but no .cls label")
            try:
                labels.append(int(classes[key].decode().strip()))
            except ValueError:
                raise DataError(
                    f"{shard}: the label of sample '{key}' is not an integer: {classes[key][:20]!r}"
                ) from None
            files.append(src)
    if not files:
        raise DataError(f"{root} holds no samples in *.tar shards")
    channels, size = _probe(files, size, root)
    return FileSplit(files, torch.tensor(labels, dtype=torch.long), size, channels)


class _Reader(torch.utils.data.Dataset):
    """What a worker computes for one index: the image (or the error), its label and its index."""

    def __init__(self, split: FileSplit, augment: str, seed: int, epoch: int) -> None:
        self.split, self.augment, self.seed, self.epoch = split, augment, seed, epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            x = self.split.read(i, self.augment, _seed(self.seed, self.epoch, i))
        except DataError as exc:
            return None, str(exc), i
        return x, int(self.split.y[i]), i


def _collate(samples):
    good = [s for s in samples if s[0] is not None]
    errors = [s[1] for s in samples if s[0] is None]
    if not good:
        return None, None, None, errors
    return (
        torch.stack([s[0] for s in good]),
        torch.tensor([s[1] for s in good], dtype=torch.long),
        torch.tensor([s[2] for s in good], dtype=torch.long),
        errors,
    )


class StreamLoader:
    """Batches ``(x, y, index)`` of a :class:`FileSplit`, decoded by ``workers`` DataLoader processes."""

    def __init__(
        self,
        split: FileSplit,
        batch_size: int,
        *,
        seed: int = 0,
        augment: str = "none",
        workers: int = 2,
        skip_corrupt: bool = False,
        dist=None,
        pin: bool = False,
        drop_last: bool = False,
    ) -> None:
        self.split, self.batch_size, self.seed, self.augment = split, batch_size, seed, augment
        self.workers, self.skip_corrupt, self.dist, self.pin, self.drop_last = (
            workers,
            skip_corrupt,
            dist,
            pin,
            drop_last,
        )
        self.epoch, self.start = 0, 0
        self.skipped: list[str] = []  #: messages of the files left out so far

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.split), generator=torch.Generator().manual_seed(_seed(self.seed, self.epoch)))
        out = []
        for b in range(self.start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            out.append((self.dist.shard(idx) if self.dist is not None and self.dist.enabled else idx).tolist())
        return out

    def __iter__(self):
        per_sample = "imagenet" if self.augment == "imagenet" else "none"
        batches = self._batches()
        loader = torch.utils.data.DataLoader(
            _Reader(self.split, per_sample, self.seed, self.epoch),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.pin,
            # its workers' base seed from here, not from the global generator: the
            # attacks' random starts must not depend on where an epoch was resumed
            generator=torch.Generator().manual_seed(_seed(self.seed, self.epoch, 3)),
        )
        for b, (x, y, idx, errors) in enumerate(loader, self.start):
            if errors:
                if not self.skip_corrupt:
                    raise DataError(errors[0])
                self.skipped += errors
            if x is None:
                continue
            x = x.float().div_(255.0)
            if self.augment in ("crop", "crop_flip"):  # drawn for the global batch, as BatchLoader does
                n_global = min(self.batch_size, len(self.split) - b * self.batch_size)
                params = draw_augment(
                    n_global, self.augment, torch.Generator().manual_seed(_seed(self.seed, self.epoch, b, 7))
                )
                if self.dist is not None and self.dist.enabled:
                    params = tuple(self.dist.shard(p) for p in params)
                kept = set(idx.tolist())
                keep = torch.tensor([i in kept for i in batches[b - self.start]], dtype=torch.bool)
                x = augment_batch(x, *(p[keep] for p in params))
            yield x, y, idx


def robustbench_imagenet() -> tuple[list[str], dict[str, int]]:
    """RobustBench's fixed ImageNet evaluation subset (5 000 validation images, ``WNID/FILE``) and its class index,
    read from the installed ``robustbench`` package's files without importing it."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "--subset robustbench reads RobustBench's image list from the robustbench package: pip install "
            "robustbench, or pass --subset FILE with one WNID/FILE per line"
        )
    base = Path(list(spec.submodule_search_locations)[0]) / "helper_files"
    try:
        ids = (base / "imagenet_test_image_ids.txt").read_text().split()
        classes = json.loads((base / "imagenet_class_to_id_map.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"the installed robustbench package lacks its ImageNet subset files ({exc})") from None
    return ids, classes


def subset_of(split, subset: str) -> "FileSplit":
    """The images of a streamed test split named by ``subset``: ``robustbench`` or a file of ``CLASS/FILE`` lines
    (paths relative to the test folder), in the list's order. RobustBench's subset takes its labels from
    RobustBench's class index."""
    if not isinstance(split, FileSplit) or not all(isinstance(f, str) for f in split.files[:1]):
        raise DataError(
            "--subset selects files of a streamed image-folder test split (data.stream=on); this test "
            "split is not one — use --n for the first N points"
        )
    classes = None
    if subset == "robustbench":
        ids, classes = robustbench_imagenet()
    else:
        try:
            ids = Path(subset).read_text().split()
        except OSError as exc:
            raise DataError(f"cannot read the subset list {subset}: {exc.strerror or exc}") from None
    where = {f"{Path(f).parent.name}/{Path(f).name}": i for i, f in enumerate(split.files)}
    missing = [i for i in ids if i not in where]
    if missing:
        root = Path(split.files[0]).parent.parent
        raise DataError(
            f"{len(missing)} of the subset's {len(ids)} images are not in {root} (first: {missing[0]}); "
            f"the subset lists CLASS/FILE paths relative to the test folder"
        )
    out = split.subset(torch.tensor([where[i] for i in ids], dtype=torch.long))
    if classes is not None:
        out.y = torch.tensor([classes[i.split("/")[0]] for i in ids], dtype=torch.long)
    return out
