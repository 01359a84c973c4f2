"""Extra training data: generated or unlabeled images mixed into every batch (Carmon et al. 2019's RST, Gowal et al.
2020, Rebuffi et al. 2021, Wang et al. 2023).

``data.extra = ["gen/1m.npz", "unlabeled/"]`` adds sources — ``.npz`` files (arrays ``x``/``y``, or ``image``/``label``
as the generated-data files of Wang et al. name them; ``y`` optional), folders of WebDataset shards or of class
sub-folders (labelled, read per batch like the streamed data path), or folders of loose images (unlabeled). An
uncompressed ``.npz`` (``np.savez``) is memory-mapped, not read: tens of millions of
32-px images cost no memory until a batch reads its rows. Sources without labels get pseudo-labels from
``data.teacher`` (a run directory, checkpoint, export or ``hf:`` model): computed once, cached with the teacher's
confidence under ``$REGDEFENSE_CACHE/pseudo``, reused by every later run; ``data.pseudo_min_confidence`` drops the
rows the teacher is less sure of.

:class:`MixedLoader` draws ``int(batch_size × data.extra_fraction)`` extra samples per batch (with replacement, as
the reference code does) next to the original ones; an epoch is one pass over the original training split, so the
schedule, ``epochs`` and the held-out split mean what they mean without extra data. Everything a batch holds is a
function of ``(seed, epoch, batch)``, so a run resumed mid-epoch sees the same batches. ``step.index`` numbers
original samples ``0..N-1`` and extra sample ``k`` as ``N + k``; :meth:`Extra.origin` says which source file and row
that is.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from regdefense.base.checkpoint import fingerprint
from regdefense.base.errors import DataError
from regdefense.base.files import write_atomic
from regdefense.base.paths import cache_dir
from regdefense.base.runtime import resolve_device
from regdefense.data.augment import augment_batch, draw_augment
from regdefense.data.stream import scan_folder, scan_shards
from regdefense.models.weights import MODEL_FILES, is_export, resolve
from regdefense.training.restore import load_model


def _npz_member(path: Path, name: str) -> np.ndarray:
    """Array ``name`` of an npz file: memory-mapped when stored uncompressed, read otherwise."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with zf.open(info) as fh:
                fmt = np.lib.format
                version = fmt.read_magic(fh)
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                header = fh.tell()
            # the member's data start after the zip's local header (30 bytes + name + extra) and the .npy header
            with open(path, "rb") as raw:
                raw.seek(info.header_offset + 26)
                n_name, n_extra = np.frombuffer(raw.read(4), dtype="<u2")
            offset = info.header_offset + 30 + int(n_name) + int(n_extra) + header
            if not dtype.hasobject:
                return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as arrays:
        return arrays[name]


class ArraySource:
    """One npz file: images (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or float in [0, 1]; labels optional."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            names = set(zipfile.ZipFile(path).namelist())
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"data.extra: {path} is not a readable .npz file: {exc}") from None
        xkey = next((k for k in ("x", "image") if f"{k}.npy" in names), None)
        if xkey is None:
            raise DataError(
                f"data.extra: {path} holds no image array 'x' (or 'image'); found {sorted(n[:-4] for n in names)}"
            )
        self.x = _npz_member(path, xkey)
        ykey = next((k for k in ("y", "label") if f"{k}.npy" in names), None)
        self.y = np.array(_npz_member(path, ykey), dtype=np.int64) if ykey else None  # a copy: labels are small
        if self.x.ndim == 3:
            self.layout = "nhw"
        elif self.x.ndim == 4 and self.x.shape[-1] in (1, 3) and self.x.shape[1] not in (1, 3):
            self.layout = "nhwc"
        elif self.x.ndim == 4:
            self.layout = "nchw"
        else:
            raise DataError(f"data.extra: {path}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {self.x.shape}")
        if self.y is not None and len(self.y) != len(self.x):
            raise DataError(f"data.extra: {path}: {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def chw(self) -> tuple[int, int, int]:
        s = self.x.shape
        if self.layout == "nhw":
            return 1, s[1], s[2]
        return (s[3], s[1], s[2]) if self.layout == "nhwc" else (s[1], s[2], s[3])

    def rows(self, rows: np.ndarray) -> Tensor:
        order = np.argsort(rows, kind="stable")  # a memory map reads sorted rows fastest
        block = np.empty((len(rows), *self.x.shape[1:]), dtype=self.x.dtype)
        block[order] = self.x[rows[order]]
        t = torch.from_numpy(block)
        t = t.unsqueeze(1) if self.layout == "nhw" else t.permute(0, 3, 1, 2) if self.layout == "nhwc" else t
        return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


class StreamSource:
    """Labelled image files read when a batch needs them: a folder of class sub-folders, or of WebDataset shards
    (``*.tar``, read by offset) — the index of the streamed data path (:mod:`regdefense.data.stream`); resized to the
    training images' size. Decoded in the training process, batch by batch."""

    def __init__(self, path: Path, size: int | None) -> None:

        self.path = path
        self.split = scan_shards(path, size) if any(path.glob("*.tar")) else scan_folder(path, None, size)[0]
        self.y = self.split.y.numpy()

    def __len__(self) -> int:
        return len(self.split)

    @property
    def chw(self) -> tuple[int, int, int]:
        c, h, w = self.split.shape[1:]
        return c, h, w

    def rows(self, rows: np.ndarray) -> Tensor:
        return self.split.floats(torch.from_numpy(np.asarray(rows, dtype=np.int64)))


class FolderSource:
    """Loose images without labels in one folder, decoded into memory (pseudo-labelled by ``data.teacher``)."""

    def __init__(self, path: Path, size: int | None) -> None:
        from PIL import Image

        self.path = path
        files = [f for f in sorted(path.iterdir()) if f.is_file()]
        if not files:
            raise DataError(f"data.extra: {path} holds no images")
        images = []
        for f in files:
            try:
                with Image.open(f) as opened:
                    im: Image.Image = opened.convert("RGB") if opened.mode not in ("L", "RGB") else opened
                    images.append(np.asarray(im.resize((size, size)) if size else im))
            except OSError as exc:
                raise DataError(f"data.extra: cannot decode {f}: {exc}") from None
        self.x = np.stack(images)
        self.layout = "nhw" if self.x.ndim == 3 else "nhwc"
        self.y = None

    __len__ = ArraySource.__len__
    chw = ArraySource.chw
    rows = ArraySource.rows


@dataclass
class Extra:
    """The extra samples of a run: their sources, labels (given or pseudo), and which rows are kept."""

    sources: list[Any]
    labels: Tensor  #: per kept sample
    keep: list[np.ndarray]  #: per source, its kept rows
    confidence: Tensor | None = None  #: the teacher's softmax confidence per kept sample (pseudo-labelled ones)
    pseudo: Tensor | None = None  #: True where the label is a pseudo-label
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [len(k) for k in self.keep])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def origin(self, k: int) -> tuple[str, int]:
        """Extra sample ``k`` (``step.index - N``) → (its source file, its row there)."""
        s = int(np.searchsorted(self.starts, k, side="right") - 1)
        return str(self.sources[s].path), int(self.keep[s][k - self.starts[s]])

    def floats(self, idx: Tensor) -> Tensor:
        rows = idx.cpu().numpy()
        src = np.searchsorted(self.starts, rows, side="right") - 1
        out: Tensor | None = None
        for s in np.unique(src):
            where = np.nonzero(src == s)[0]
            part = self.sources[s].rows(self.keep[s][rows[where] - self.starts[s]])
            if out is None:
                out = torch.empty((len(rows), *part.shape[1:]))
            out[torch.from_numpy(where)] = part
        assert out is not None, "no rows asked for"
        return out


def open_sources(paths: list[str], shape: tuple[int, int, int], size: int | None = None) -> list[Any]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        src: Any
        if path.suffix == ".npz" and path.is_file():
            src = ArraySource(path)
        elif path.is_dir() and (any(path.glob("*.tar")) or any(d.is_dir() for d in path.iterdir())):
            src = StreamSource(path, size or shape[-1])
        elif path.is_dir():
            src = FolderSource(path, size or shape[-1])
        elif path.suffix == ".tar" or not path.exists():
            raise DataError(
                f"data.extra: {p} "
                + ("does not exist" if not path.exists() else "is one shard; give the folder that holds the shards")
            )
        else:
            raise DataError(f"data.extra: {p} is neither an .npz file nor an image folder")
        if tuple(src.chw) != tuple(shape):
            raise DataError(
                f"data.extra: {p} has images of shape {tuple(src.chw)}; the training data's are {tuple(shape)}"
            )
        out.append(src)
    return out


def load_extra(cfg, shape: tuple[int, int, int], num_classes: int, *, device: str = "auto", echo=print) -> Extra | None:
    """Open ``cfg.extra`` (a DataConfig), pseudo-label what has no labels with ``cfg.teacher``, filter by confidence."""
    if not cfg.extra:
        return None
    sources = open_sources(cfg.extra, shape, cfg.image_size)
    labels, conf, pseudo = [], [], []
    info: dict[str, Any] = {"sources": [str(s.path) for s in sources]}
    for src in sources:
        if src.y is not None:
            y = torch.from_numpy(np.asarray(src.y, dtype=np.int64))
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise DataError(f"data.extra: {src.path} has labels outside 0..{num_classes - 1}")
            labels.append(y)
            conf.append(torch.ones(len(y)))
            pseudo.append(torch.zeros(len(y), dtype=torch.bool))
            continue
        if not cfg.teacher:
            raise DataError(
                f"data.extra: {src.path} has no labels; give data.teacher = RUN (a model to pseudo-label "
                f"it, as RST does) or store labels with the images"
            )
        y, c = pseudo_labels(src, cfg.teacher, device=device, echo=echo)
        labels.append(y)
        conf.append(c)
        pseudo.append(torch.ones(len(y), dtype=torch.bool))
    keep = []
    for y, c in zip(labels, conf):
        keep.append(np.nonzero((c >= cfg.pseudo_min_confidence).numpy())[0])
    labels_all = torch.cat([y[torch.from_numpy(k)] for y, k in zip(labels, keep)])
    conf_all = torch.cat([c[torch.from_numpy(k)] for c, k in zip(conf, keep)])
    pseudo_all = torch.cat([p[torch.from_numpy(k)] for p, k in zip(pseudo, keep)])
    info |= {
        "rows": sum(len(s) for s in sources),
        "kept": int(len(labels_all)),
        "pseudo_labelled": int(pseudo_all.sum()),
    }
    if not len(labels_all):
        raise DataError(f"data.extra: no sample is left after data.pseudo_min_confidence={cfg.pseudo_min_confidence}")
    return Extra(sources, labels_all, keep, conf_all, pseudo_all, info)


def _source_digest(src) -> str:
    st = src.path.stat()
    h = hashlib.sha256(f"{src.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    if src.path.is_file():
        with open(src.path, "rb") as fh:  # the first MiB too: a rewritten file with the same size and time
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _weights_file(teacher: str) -> Path | None:
    """The file holding the teacher's weights (a run's best.pt, a checkpoint, an export's weights), found without
    loading the model, so a cached answer costs no model load; None for a zoo model (keyed by its name)."""
    if str(teacher).startswith("robustbench:"):
        return None
    path = Path(resolve(teacher))
    if is_export(path):
        return next((f for f in (path / name for name in MODEL_FILES.values()) if f.exists()), None)
    path = path / "checkpoints" / "best.pt" if path.is_dir() else path
    return path if path.is_file() else None


def pseudo_labels(
    src, teacher: str, *, device: str = "auto", batch_size: int = 512, echo=print
) -> tuple[Tensor, Tensor]:
    """The teacher's labels and softmax confidence for every row of ``src``, computed once and cached (keyed by the
    teacher's weights and the source file)."""
    weights = _weights_file(teacher)
    key = hashlib.sha256(
        ((fingerprint(weights) if weights is not None else str(teacher)) + "|" + _source_digest(src)).encode()
    ).hexdigest()[:20]
    path = cache_dir() / "pseudo" / f"{key}.pt"
    if path.exists():
        try:
            cached = torch.load(path, weights_only=True)
            if len(cached["labels"]) == len(src):
                echo(f"pseudo-labels for {src.path}: cached ({path})")
                return cached["labels"], cached["confidence"]
        except (OSError, RuntimeError, KeyError):
            pass  # unreadable: compute again
    echo(f"pseudo-labelling {len(src)} images of {src.path} with {teacher} ...")
    dev = resolve_device(device)
    model = load_model(teacher, device=str(dev))  # only on a cache miss
    labels, conf = [], []
    with torch.no_grad():
        for start in range(0, len(src), batch_size):
            x = src.rows(np.arange(start, min(start + batch_size, len(src)))).to(dev)
            p = torch.softmax(model(x).float(), dim=1)
            c, y = p.max(dim=1)
            labels.append(y.cpu())
            conf.append(c.cpu())
    labels_t, conf_t = torch.cat(labels), torch.cat(conf)
    cached = {"labels": labels_t, "confidence": conf_t}
    write_atomic(path, lambda fh: torch.save(cached, fh), "the pseudo-label cache")  # two runs may fill it at once
    info = {"teacher": str(teacher), "source": str(src.path), "rows": len(src)}
    write_atomic(path.with_suffix(".json"), json.dumps(info), "the pseudo-label cache")
    return labels_t, conf_t


class MixedLoader:
    """Batches of ``(x, y, index)`` holding ``batch_size - int(batch_size × fraction)`` original samples (one pass
    over the original split per epoch) and extra samples drawn with replacement to fill the batch."""

    def __init__(
        self,
        split,
        extra: Extra,
        batch_size: int,
        fraction: float,
        *,
        seed: int = 0,
        augment: str = "none",
        dist=None,
        pin: bool = False,
    ) -> None:
        self.split, self.extra, self.batch_size, self.seed = split, extra, batch_size, seed
        self.n_extra = int(batch_size * fraction)
        self.n_orig = batch_size - self.n_extra
        if self.n_orig < 1:
            raise DataError(f"data.extra_fraction={fraction} leaves no original sample in a batch of {batch_size}")
        self.augment, self.dist, self.pin, self.epoch, self.start = augment, dist, pin, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return -(-len(self.split) // self.n_orig)

    def global_batch(self, i: int) -> int:
        return self.batch_size  # every batch is filled up with extra samples

    def __iter__(self):
        n = len(self.split)
        base = self.seed * 100_003 + self.epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(base))
        for i in range(self.start, len(self)):
            gen = torch.Generator().manual_seed(base * 100_019 + i)
            orig = order[i * self.n_orig : (i + 1) * self.n_orig]
            rows = torch.randint(len(self.extra), (self.batch_size - len(orig),), generator=gen)
            idx = torch.cat([orig, rows + n])
            mix = torch.randperm(len(idx), generator=gen)  # originals and extras interleaved across processes
            idx = idx[mix]
            params = draw_augment(len(idx), self.augment, gen) if self.augment != "none" else None
            if self.dist is not None and self.dist.enabled:
                idx = self.dist.shard(idx)
                params = params and tuple(self.dist.shard(p) for p in params)
            is_orig = idx < n
            x = torch.empty((len(idx), *self.split.shape[1:]))
            y = torch.empty(len(idx), dtype=torch.int64)
            if is_orig.any():
                x[is_orig] = self.split.floats(idx[is_orig].to(self.split.x.device)).cpu()
                y[is_orig] = self.split.y[idx[is_orig].to(self.split.y.device)].cpu()
            if (~is_orig).any():
                x[~is_orig] = self.extra.floats(idx[~is_orig] - n)
                y[~is_orig] = self.extra.labels[idx[~is_orig] - n]
            if params is not None:
                x = augment_batch(x, *params)
            if self.pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y, idx
