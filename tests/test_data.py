"""Datasets: the embedded digits, user folders (npz and image folders), loaders yielding indices."""

import numpy as np
import pytest
import torch

from regdefense.base.config import DataConfig
from regdefense.base.errors import DataError
from regdefense.data.sources import BatchLoader, augment_batch, draw_augment, load_data


def test_digits_are_embedded_with_a_fixed_split():
    a = load_data(DataConfig())
    b = load_data(DataConfig(), seed=99)
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert len(a.test) == 360 and len(a.train) + len(a.val) == 1797 - 360
    assert torch.equal(a.test.y, b.test.y) and torch.equal(a.val.y, b.val.y)
    x = a.train.floats()
    assert x.min() >= 0 and x.max() <= 1 and x.dtype == torch.float32


def test_loader_yields_dataset_indices_and_is_deterministic_per_epoch():
    data = load_data(DataConfig())
    loader = BatchLoader(data.train, 100, seed=3)
    seen = []
    for x, y, idx in loader:
        assert torch.equal(y, data.train.y[idx]) and torch.equal(x, data.train.floats(idx))
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(len(data.train)))
    first = [i for _, _, i in loader]
    loader.set_epoch(1)
    second = [i for _, _, i in loader]
    loader.set_epoch(0)
    again = [i for _, _, i in loader]
    assert not torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first, again))


def test_augmentation_crops_and_flips_within_the_padded_image():
    x = torch.rand(64, 3, 8, 8)
    dy, dx, flip = draw_augment(64, "crop_flip", torch.Generator().manual_seed(0), pad=2)
    out = augment_batch(x, dy, dx, flip, pad=2)
    assert out.shape == x.shape and not torch.equal(out, x)
    centred = torch.full((64,), 2)
    assert torch.equal(augment_batch(x, centred, centred, torch.zeros(64, dtype=torch.bool), pad=2), x)
    assert torch.equal(augment_batch(x, centred, centred, torch.ones(64, dtype=torch.bool), pad=2), x.flip(3))
    # offset (0, 0) shows the zero padding in the top-left corner
    corner = augment_batch(x, torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long),
                           torch.zeros(64, dtype=torch.bool), pad=2)
    assert corner[:, :, :2, :].abs().sum() == 0 and torch.equal(corner[:, :, 2:, 2:], x[:, :, :6, :6])


def test_loader_resumes_mid_epoch_with_the_same_batches_and_augmentations():
    data = load_data(DataConfig(name="digits"))
    full = list(BatchLoader(data.train, 100, seed=5, augment="crop_flip"))
    loader = BatchLoader(data.train, 100, seed=5, augment="crop_flip")
    loader.set_epoch(0, start=4)
    rest = list(loader)
    assert len(rest) == len(full) - 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(full[4:], rest))


def _npz(folder, x_train, y_train, x_test=None, y_test=None):
    folder.mkdir(exist_ok=True)
    np.savez(folder / "train.npz", x=x_train, y=y_train)
    np.savez(folder / "test.npz", x=x_test if x_test is not None else x_train,
             y=y_test if y_test is not None else y_train)
    return str(folder)


@pytest.mark.parametrize("shape", [(20, 12, 12), (20, 12, 12, 3), (20, 3, 12, 12)])
def test_npz_folder_layouts(tmp_path, shape):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    y = rng.integers(0, 4, size=20)
    data = load_data(DataConfig(name=_npz(tmp_path / "d", x, y), val_fraction=0.0))
    c = 1 if len(shape) == 3 else 3
    assert data.input_shape == (c, 12, 12) and data.num_classes == int(y.max()) + 1
    assert torch.allclose(data.train.floats()[0, 0], torch.tensor(x[0] if c == 1 else (
        x[0, :, :, 0] if shape[-1] == 3 else x[0, 0]), dtype=torch.float32) / 255)


@pytest.mark.parametrize("x, y, message", [
    (np.full((4, 8, 8), 2.0, np.float32), np.zeros(4, int), r"float pixels must lie in \[0,1\], found \[2, 2\]"),
    (np.full((4, 8, 8), np.nan, np.float32), np.zeros(4, int), "NaN"),
    (np.zeros((4, 8, 8), np.float32), np.zeros(3, int), "x has 4 samples but y has 3"),
    (np.zeros((4, 8, 8), np.float32), np.zeros(4, float), "y must be a 1-D integer array"),
    (np.zeros((4, 8, 8), np.float32), -np.ones(4, int), "labels must be >= 0"),
    (np.zeros((4, 8), np.float32), np.zeros(4, int), "x must have shape"),
])
def test_bad_arrays_are_rejected_with_the_reason(tmp_path, x, y, message):
    with pytest.raises(DataError, match=message):
        load_data(DataConfig(name=_npz(tmp_path / "d", x, y)))


def test_empty_dataset_is_rejected(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_data(DataConfig(name=_npz(tmp_path / "d", np.zeros((0, 8, 8), np.uint8), np.zeros(0, int))))


def test_image_folder_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    data = load_data(DataConfig(name=str(tmp_path / "imgs"), val_fraction=0.0))
    assert data.input_shape == (3, 10, 10) and len(data.train) == 6 and len(data.test) == 4
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    resized = load_data(DataConfig(name=str(tmp_path / "imgs"), val_fraction=0.0, image_size=6))
    assert resized.input_shape == (3, 6, 6)


def test_missing_and_unknown_datasets(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(name=str(tmp_path / "nope")))
    with pytest.raises(DataError, match=r"unknown dataset 'cifar11'.*did you mean 'cifar10'"):
        load_data(DataConfig(name="cifar11"))
    with pytest.raises(DataError, match="must hold train.npz and test.npz"):
        load_data(DataConfig(name=str(tmp_path)))
    with pytest.raises(DataError, match=r"cifar10 was not found under .*pass --download"):
        load_data(DataConfig(name="cifar10", data_dir=str(tmp_path / "tv")))


def test_torchvision_loading_code_on_a_local_copy(tmp_path):
    """MNIST's loader reads the raw idx files; write a tiny copy in that format and load it."""
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    data = load_data(DataConfig(name="mnist", data_dir=str(tmp_path), val_fraction=0.0))
    assert data.input_shape == (1, 28, 28) and len(data.train) == 12 and len(data.test) == 5
    assert data.default_eps == 0.3
