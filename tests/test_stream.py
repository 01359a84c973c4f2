"""Streamed image folders: lazy files decoded in DataLoader workers, exact mid-epoch resume, each process's share,
corrupt files named or skipped and counted — on small PNG/JPEG folders made here."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regdefense import hookimpl
from regdefense.base import checkpoint
from regdefense.base.config import DataConfig
from regdefense.base.errors import DataError
from regdefense.base.safety import TrainingInterrupted
from regdefense.data.sources import load_data
from regdefense.data.stream import FileSplit, StreamLoader
from regdefense.host.discovery import activate
from regdefense.training.loop import Trainer
from regdefense.training.run import load_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes of 16×16 RGB images (a coloured square on noise), PNG and JPEG mixed: 90 train, 30 test."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                img[4:12, 4:12, c] = 200 + rng.integers(0, 50)
                Image.fromarray(img).save(d / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def _cfg(folder, extra=()):
    return load_config(defenses=["pgd_at"], overrides=[
        f"data.name={folder}", "data.stream=on", "data.workers=2", "data.image_size=12", "data.augment=imagenet",
        "train.batch_size=16", "train.epochs=2", "train.device=cpu", "train.progress=false", "train.deterministic=true",
        "pgd_at.steps=2", "eval.val_samples=16", "eval.pgd_steps=1", "eval.test_samples=16", "model.name=digits_cnn",
        *extra])


def test_folders_stream_as_files_and_the_transforms_give_the_asked_size(folder):
    data = load_data(DataConfig(name=str(folder), stream="on", image_size=12, augment="imagenet"))
    assert isinstance(data.train, FileSplit) and isinstance(data.test, FileSplit)
    assert data.input_shape == (3, 12, 12) and len(data.train) + len(data.val) == 90
    x = data.test.floats(torch.arange(4))
    assert x.shape == (4, 3, 12, 12) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(DataError, match="augment=imagenet needs streamed"):
        load_data(DataConfig(name=str(folder), stream="off", augment="imagenet", image_size=12))


def test_workers_do_not_change_the_batches(folder):
    data = load_data(DataConfig(name=str(folder), stream="on", image_size=12, val_fraction=0))
    seen = []
    for workers in (0, 2):
        loader = StreamLoader(data.train, 16, seed=3, augment="imagenet", workers=workers)
        loader.set_epoch(1)
        seen.append(list(loader))
    for (xa, ya, ia), (xb, yb, ib) in zip(*seen):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
    first = StreamLoader(data.train, 16, seed=3, augment="imagenet", workers=0)
    first.set_epoch(2)
    assert not torch.equal(next(iter(first))[2], seen[0][0][2])  # another epoch, another order


class _Dist:
    """torchrun's view for one of two processes (the loader only asks for the rank's slice)."""

    def __init__(self, rank):
        self.rank, self.world, self.enabled = rank, 2, True

    def shard(self, idx):
        return idx.tensor_split(2)[self.rank]


def test_two_processes_see_every_index_of_an_epoch_exactly_once(folder):
    data = load_data(DataConfig(name=str(folder), stream="on", image_size=12, val_fraction=0))
    shares = []
    for rank in (0, 1):
        loader = StreamLoader(data.train, 16, seed=0, augment="crop_flip", workers=2, dist=_Dist(rank))
        shares.append(torch.cat([idx for _, _, idx in loader]))
    both = torch.cat(shares)
    assert sorted(both.tolist()) == list(range(len(data.train)))  # each exactly once, global indices
    assert not set(shares[0].tolist()) & set(shares[1].tolist())


class _SignalAt:
    name = "signal_at"

    def __init__(self, step):
        self.step = step

    @hookimpl
    def regdefense_batch_end(self, trainer, step):
        if trainer.state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _interrupted_and_resumed_equals_whole(root, tmp_path, stop_at):
    """Train 2 epochs whole, and again stopped by SIGINT after global step ``stop_at`` then resumed: same weights."""
    def trainer(extra, run):
        cfg = _cfg(root)
        return Trainer(cfg, pm=activate(["pgd_at", *extra], cfg.defense), run_dir=tmp_path / run)

    full = trainer([], "full")
    full.fit()
    with pytest.raises(TrainingInterrupted):
        trainer([_SignalAt(stop_at)], "cut").fit()
    saved = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1 and saved["batch"] > 0  # stopped inside the second epoch
    resumed = trainer([], "cut")
    resumed.resume_from(tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed.fit()
    a, b = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_run_interrupted_mid_epoch_resumes_bit_identically(folder, tmp_path):
    _interrupted_and_resumed_equals_whole(folder, tmp_path, 7)


def test_a_corrupt_image_is_named_or_skipped_and_counted(folder, tmp_path):
    import shutil

    bad = tmp_path / "data"
    shutil.copytree(folder, bad)
    (bad / "train" / "class1" / "000.jpg").write_bytes(b"this is not a JPEG")
    cfg = _cfg(bad, ["data.val_fraction=0", "train.epochs=1"])
    with pytest.raises(DataError, match=r"cannot decode image .*class1/000\.jpg.*data\.skip_corrupt=true"):
        Trainer(cfg, pm=activate(["pgd_at"], cfg.defense)).fit()
    cfg = _cfg(bad, ["data.val_fraction=0", "train.epochs=1", "data.skip_corrupt=true"])
    trainer = Trainer(cfg, pm=activate(["pgd_at"], cfg.defense))
    history = trainer.fit()
    assert history[-1]["skipped_images"] == 1 and "000.jpg" in trainer.train_loader.skipped[0]


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """The same images as WebDataset tar shards written by webdataset's own TarWriter (KEY.jpg/png + KEY.cls),
    two shards per split."""
    wds = pytest.importorskip("webdataset")
    root = tmp_path_factory.mktemp("shards")
    for split in ("train", "test"):
        (root / split).mkdir()
        files = sorted((folder / split).glob("*/*"))
        half = len(files) // 2
        for k, chunk in enumerate((files[:half], files[half:])):
            with wds.TarWriter(str(root / split / f"{split}-{k:06d}.tar")) as sink:
                for f in chunk:
                    sink.write({"__key__": f"{f.parent.name}_{f.stem}", f.suffix[1:]: f.read_bytes(),
                                "cls": str(int(f.parent.name[-1])).encode()})
    return root


def test_tar_shards_give_the_same_samples_as_the_folder(folder, shards):
    a = load_data(DataConfig(name=str(folder), stream="on", image_size=12, val_fraction=0))
    b = load_data(DataConfig(name=str(shards), image_size=12, val_fraction=0))
    assert isinstance(b.train.files[0], tuple) and len(b.train) == len(a.train) == 90
    assert sorted(b.train.y.tolist()) == sorted(a.train.y.tolist())
    # sample by sample, the bytes in the shard decode to the file's image
    by_name = {f"{Path(f).parent.name}_{Path(f).stem}": i for i, f in enumerate(a.train.files)}
    for j in (0, 17, 89):
        key = Path(b.train.files[j][3]).name.split(".")[0]
        assert torch.equal(b.train.read(j), a.train.read(by_name[key])) and b.train.y[j] == a.train.y[by_name[key]]


def test_a_run_on_tar_shards_trains_and_resumes_bit_identically(shards, tmp_path):
    _interrupted_and_resumed_equals_whole(shards, tmp_path, 6)


def test_a_corrupt_sample_in_a_shard_is_named(shards, tmp_path):
    import tarfile

    bad = tmp_path / "bad"
    for split in ("train", "test"):
        (bad / split).mkdir(parents=True)
        for shard in (shards / split).glob("*.tar"):
            (bad / split / shard.name).write_bytes(shard.read_bytes())
    shard = sorted((bad / "train").glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        member = next(m for m in tf if m.name.endswith((".png", ".jpg")))
    with open(shard, "r+b") as fh:  # overwrite that image's bytes inside the shard
        fh.seek(member.offset_data)
        fh.write(b"\0" * member.size)
    data = load_data(DataConfig(name=str(bad), image_size=12, val_fraction=0))
    i = next(i for i, f in enumerate(data.train.files) if f[3] == member.name)
    with pytest.raises(DataError, match=f"cannot decode image .*{shard.name}:{member.name}"):
        data.train.read(i)
    (bad / "train" / "junk.tar").write_bytes(b"not a tar file at all" * 30)
    with pytest.raises(DataError, match="junk.tar is not a readable tar shard"):
        load_data(DataConfig(name=str(bad), image_size=12))


def test_memory_stays_flat_as_the_streamed_dataset_grows(tmp_path):
    """Peak RSS of one epoch (benchmarks/loader.py's measurement, a fresh process each): streamed, 20 000 images
    cost less than 10 % more than 2 000; decoded into memory, they cost more."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("loader_bench", Path(__file__).parent.parent / "benchmarks" / "loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peak = {}
    for n in (2000, 20000):
        root = bench.make_folder(tmp_path / str(n), n, 32, fmt="png")
        for stream in ("on", "off"):
            r = bench.rss_subprocess(root, stream)
            assert r["images"] == n and r["streamed"] == (stream == "on")
            peak[n, stream] = r["peak_rss_mib"]
    assert peak[20000, "on"] < 1.10 * peak[2000, "on"], peak
    # 18 000 more 32-px RGB images are 53 MiB decoded: the in-memory path holds them (and their decoding copies)
    assert peak[20000, "off"] - peak[2000, "off"] > 40, peak


# --- per-sample buffers that do not fit -------------------------------------------------------


def test_fgsm_pgk_buffers_memory_mapped_on_disk_train_exactly_as_in_host_memory(tmp_path):
    from regdefense.testing import make_trainer

    runs = {}
    for where in ("host", "disk"):
        trainer = make_trainer(["fgsm_pgk"], ["train.epochs=2", "train.deterministic=true",
                                              f"fgsm_pgk.buffers={where}", "fgsm_pgk.precision=float16"],
                               run_dir=tmp_path / where)
        trainer.fit()
        runs[where] = trainer
    a, b = runs["host"].raw_model.state_dict(), runs["disk"].raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # where the rows live changes nothing
    plugin = runs["disk"].pm.get_plugin("fgsm_pgk")
    files = sorted((tmp_path / "disk" / "buffers").glob("*.bin"))
    n = runs["disk"].train_size * 64
    assert [f.name for f in files] == ["fgsm_pgk-momentum.bin", "fgsm_pgk-prior.bin"]
    assert all(f.stat().st_size == n * 2 for f in files)  # float16, N×1×8×8 each
    assert plugin.prior.dtype == torch.float16 and plugin.prior.abs().max() > 0  # rows were written through the map
    on_disk = torch.from_file(str(files[1]), size=n, dtype=torch.float16).view_as(plugin.prior)
    assert torch.equal(on_disk, plugin.prior)
    assert plugin.state_dict() == {"files": [str(files[1]), str(files[0])]}  # the checkpoint names, not copies


def test_train_check_says_how_much_memory_a_stack_needs_and_where():
    import re

    from regdefense.base.buffers import human, place
    from regdefense.training.run import check

    text = check(defenses=["fgsm_pgk"], overrides=["fgsm_pgk.precision=float16", "train.device=cpu"])
    n = int(re.search(r"data   train (\d+)", text).group(1))
    line = next(l for l in text.splitlines() if "fgsm_pgk prior + momentum (float16)" in l)
    assert line.endswith(f": {human(2 * n * 1 * 8 * 8 * 2)} (cpu)")  # two N×1×8×8 float16 buffers, on the device
    assert "memory total (without activations)" in text
    assert place(10 ** 15, torch.device("cpu")) == "disk" and place(10 ** 3, torch.device("cpu")) == "device"
    disk = check(defenses=["fgsm_pgk"], overrides=["fgsm_pgk.buffers=disk", "train.device=cpu"])
    assert f"{human(2 * n * 64 * 4)} (disk)" in disk


# --- evaluation on a fixed subset --------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """ImageNet's layout, tiny: train/ with the 1000 WordNet-id class folders (one image each) and val/ with the
    5 000 files RobustBench's list names (10-px JPEGs) plus one it does not."""
    from regdefense.data.stream import robustbench_imagenet

    ids, classes = robustbench_imagenet()  # the installed robustbench package's own files
    root = tmp_path_factory.mktemp("imagenet")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 10, 3), dtype=np.uint8))
    for wnid in classes:
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True)
        img.save(root / "train" / wnid / "0.JPEG")
    for i in ids + [f"{next(iter(classes))}/ILSVRC2012_val_not_in_the_list.JPEG"]:
        img.save(root / "val" / i)
    return root, ids, classes


def test_the_robustbench_subset_selects_its_images_in_its_order_with_its_labels(imagenet_like, tmp_path):
    from regdefense.data.stream import subset_of
    from regdefense.evaluation.runner import evaluate
    from regdefense.models import create_model

    root, ids, classes = imagenet_like
    data = load_data(DataConfig(name=str(root), stream="on", val_fraction=0))
    assert len(data.test) == 5001  # val/ is the test split: ImageNet's layout
    sub = subset_of(data.test, "robustbench")
    assert [f"{Path(f).parent.name}/{Path(f).name}" for f in sub.files] == ids  # the list's images, in its order
    assert sub.y.tolist() == [classes[i.split("/")[0]] for i in ids]  # RobustBench's class index
    listed = tmp_path / "few.txt"
    listed.write_text("\n".join(ids[::-1][:2]))
    assert [f"{Path(f).parent.name}/{Path(f).name}" for f in subset_of(data.test, str(listed)).files] == ids[::-1][:2]
    listed.write_text("n99999999/nope.JPEG\n")
    with pytest.raises(DataError, match="1 of the subset's 1 images are not in"):
        subset_of(data.test, str(listed))
    (root / "val" / ids[0]).rename(tmp_path / "moved.JPEG")  # a partial validation set is no RobustBench number
    try:
        with pytest.raises(DataError, match="1 of the subset's 5000 images are not in"):
            subset_of(load_data(DataConfig(name=str(root), stream="on", val_fraction=0)).test, "robustbench")
    finally:
        (tmp_path / "moved.JPEG").rename(root / "val" / ids[0])
    # end to end: a model file evaluated on the subset's first 6 points, decoded alone
    model = create_model("digits_cnn", in_channels=3, num_classes=1000, image_size=10)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    report, _ = evaluate(tmp_path / "m.pt", arch="digits_cnn", dataset=str(root), subset="robustbench", n=6,
                         checks=False, progress=False, out=tmp_path / "eval")
    assert report.meta["n"] == 6


@pytest.mark.parametrize("recipe", ["pgd_at_resnet50", "pgd_at_convnext_tiny", "pgd_at_deit_small"])
def test_the_imagenet_recipes_run_on_a_small_image_folder(folder, tmp_path, recipe):
    """Each ImageNet recipe as written (streamed folders, ImageNet augmentation, its defenses, optimizer, schedule,
    label smoothing), shrunk in size only: this folder, 12 px, one epoch, CPU, and a small network in place of the
    recipe's (timm and torchvision architectures are tested on their own)."""
    from regdefense.training.run import train

    path = Path(__file__).parent.parent / "recipes" / "imagenet" / f"{recipe}.toml"
    small = [f"data.name={folder}", "data.image_size=12", "data.workers=1", "train.epochs=1", "train.batch_size=16",
             "train.amp=off", "train.device=cpu", "train.progress=false", "eval.val_samples=8", "eval.pgd_steps=1",
             "eval.test_samples=8", "train.warmup_epochs=0", "model.name=digits_cnn"]
    result = train(str(path), overrides=small, out=tmp_path / "run", echo=lambda s: None)
    assert result.history[-1]["epoch"] == 1 and np.isfinite(result.history[-1]["loss"])
