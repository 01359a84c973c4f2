"""Extra data: the batch holds the requested share of extra samples, per-sample buffers see every source at its own
rows, a mid-epoch resume with extra data ends bit-identical, and pseudo-labels are computed once and reused."""

import numpy as np
import pytest
import torch
from test_reliability import EXACT, SignalAt, _weights
from test_stream import folder, shards  # noqa: F401  (fixtures)

from regdefense.base import checkpoint
from regdefense.base.config import DataConfig
from regdefense.base.errors import DataError
from regdefense.base.safety import TrainingInterrupted
from regdefense.data.sources import Split, load_data
from regdefense.host.discovery import activate
from regdefense.testing import tiny_config
from regdefense.training.extra import Extra, MixedLoader, load_extra
from regdefense.training.loop import Trainer


@pytest.fixture
def sources(tmp_path):
    """Two extra sources cut from the digits training split: 300 images with labels, 200 without (as uint8 NHW)."""
    train = load_data(DataConfig(val_fraction=0.0)).train
    x = (train.x[:, 0].numpy() * 255).round().astype(np.uint8) if train.x.dtype != torch.uint8 else train.x[:, 0].numpy()
    np.savez(tmp_path / "labelled.npz", x=x[600:900], y=train.y[600:900].numpy())
    np.savez(tmp_path / "unlabelled.npz", image=x[900:1100])  # Wang et al.'s key name, no labels
    return tmp_path / "labelled.npz", tmp_path / "unlabelled.npz", train.y[900:1100]


def test_every_batch_holds_the_requested_share_and_an_epoch_is_one_pass_over_the_original(sources):
    labelled, _, _ = sources
    split = Split(torch.rand(100, 1, 8, 8), torch.arange(100) % 10)
    extra = load_extra(DataConfig(extra=[str(labelled)]), (1, 8, 8), 10)
    assert isinstance(extra.sources[0].x, np.memmap)  # an uncompressed npz is mapped, not read
    loader = MixedLoader(split, extra, 20, 0.3, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 8  # ceil(100 / 14): 14 originals and 6 extras a batch
    originals = torch.cat([idx[idx < 100] for _, _, idx in batches])
    assert sorted(originals.tolist()) == list(range(100))  # each original exactly once
    assert [int((idx >= 100).sum()) for _, _, idx in batches] == [6] * 7 + [18]  # the last is filled with extras
    x, y, idx = batches[0]
    ex = idx >= 100
    assert torch.equal(y[ex], extra.labels[idx[ex] - 100]) and torch.equal(x[~ex], split.floats(idx[~ex]))
    assert torch.equal(x[ex], extra.floats(idx[ex] - 100))
    again = list(MixedLoader(split, extra, 20, 0.3, seed=1))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(batches, again))  # a function of (seed, epoch, batch)


def test_pseudo_labels_are_computed_once_cached_and_filtered_by_confidence(sources, tmp_path, monkeypatch):
    from regdefense.training.run import train

    monkeypatch.setenv("REGDEFENSE_CACHE", str(tmp_path / "cache"))
    labelled, unlabelled, truth = sources
    teacher = train(defenses=[], overrides=["train.epochs=15", "train.progress=false", "train.device=cpu",
                                            "data.limit=600", "eval.val_samples=32", "eval.pgd_steps=1"],
                    out=tmp_path / "teacher", echo=lambda s: None).run_dir
    said = []
    cfg = DataConfig(extra=[str(labelled), str(unlabelled)], teacher=str(teacher))
    first = load_extra(cfg, (1, 8, 8), 10, device="cpu", echo=said.append)
    assert said[-1].startswith("pseudo-labelling 200 images")
    assert first.info["pseudo_labelled"] == 200 and len(first) == 500
    assert torch.equal(first.labels[:300], torch.from_numpy(np.load(labelled)["y"]))  # given labels are kept
    # the teacher's own predictions, computed independently
    from regdefense.evaluation.runner import load_target

    model = load_target(teacher, n=1, device="cpu").model
    with torch.no_grad():
        p = torch.softmax(model(first.sources[1].rows(np.arange(200))), 1)
    assert torch.equal(first.labels[300:], p.argmax(1)) and torch.allclose(first.confidence[300:], p.max(1).values)
    assert (first.labels[300:] == truth).float().mean() > 0.5  # a useful teacher

    second = load_extra(cfg, (1, 8, 8), 10, device="cpu", echo=said.append)
    assert said[-1].startswith(f"pseudo-labels for {unlabelled}: cached")
    assert torch.equal(second.labels, first.labels)

    threshold = float(first.confidence[300:].median())
    kept = load_extra(DataConfig(extra=[str(unlabelled)], teacher=str(teacher), pseudo_min_confidence=threshold),
                      (1, 8, 8), 10, device="cpu", echo=said.append)
    assert len(kept) == int((first.confidence[300:] >= threshold).sum()) < 200
    k = 3
    source, row = kept.origin(k)
    assert source == str(unlabelled) and first.confidence[300 + row] >= threshold
    assert torch.equal(kept.floats(torch.tensor([k])), first.sources[1].rows(np.array([row])))


def test_extra_data_errors_say_what_to_do(sources, tmp_path):
    labelled, unlabelled, _ = sources
    with pytest.raises(DataError, match="has no labels; give data.teacher"):
        load_extra(DataConfig(extra=[str(unlabelled)]), (1, 8, 8), 10)
    with pytest.raises(DataError, match=r"shape \(1, 8, 8\); the training data's are \(3, 32, 32\)"):
        load_extra(DataConfig(extra=[str(labelled)]), (3, 32, 32), 10)
    with pytest.raises(DataError, match="labels outside 0..4"):
        load_extra(DataConfig(extra=[str(labelled)]), (1, 8, 8), 5)
    with pytest.raises(DataError, match="does not exist"):
        load_extra(DataConfig(extra=[str(tmp_path / "nope.npz")]), (1, 8, 8), 10)


EXTRA = ["data.extra_fraction=0.5", "fgsm_pgk.buffers=host"]


def test_fgsm_pgk_buffers_index_extra_samples_and_a_mid_epoch_resume_is_bit_identical(sources, tmp_path):
    labelled, _, _ = sources
    over = [*EXACT, *EXTRA, f'data.extra=["{labelled}"]']
    from regdefense.training.run import check

    cfg = tiny_config(["fgsm_pgk"], over)
    assert "extra  300 samples from 1 source(s) (0 pseudo-labelled), 0.5 of each batch; 9 batches" in check(cfg)
    full = Trainer(cfg, pm=activate(["fgsm_pgk"], cfg.defense), run_dir=tmp_path / "full")
    assert full.index_size == full.train_size + 300 and isinstance(full.train_loader, MixedLoader)
    full.fit()
    prior = next(p for p in full.pm.get_plugins() if getattr(p, "name", "") == "fgsm_pgk").prior
    assert prior.shape[0] == full.index_size
    touched = prior.flatten(1).abs().sum(1) > 0
    assert touched[:full.train_size].all() and touched[full.train_size:].any()  # extra rows written at N + k

    cfg = tiny_config(["fgsm_pgk"], over)
    cut = Trainer(cfg, pm=activate(["fgsm_pgk", SignalAt(7)], cfg.defense), run_dir=tmp_path / "cut")
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    assert checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt")["batch"] > 0  # stopped mid-epoch
    cfg = tiny_config(["fgsm_pgk"], over)
    resumed = Trainer(cfg, pm=activate(["fgsm_pgk"], cfg.defense), run_dir=tmp_path / "cut")
    resumed.resume_from(tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed.fit()
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extra_keeps_its_origin_per_source():
    class Src:
        def __init__(self, path, n):
            self.path, self.n = path, n

        def __len__(self):
            return self.n

    extra = Extra([Src("a.npz", 5), Src("b.npz", 4)], torch.zeros(6, dtype=torch.long),
                  [np.array([0, 2, 4]), np.array([1, 2, 3])])
    assert [extra.origin(k) for k in range(6)] == [("a.npz", 0), ("a.npz", 2), ("a.npz", 4), ("b.npz", 1),
                                                   ("b.npz", 2), ("b.npz", 3)]


def test_the_swish_wideresnets_and_the_cosinew_schedule_of_the_extra_data_recipes():
    from regdefense.base.config import TrainConfig
    from regdefense.models import create_model
    from regdefense.training.run import load_config
    from regdefense.training.schedule import build_scheduler

    relu = create_model("wideresnet", in_channels=3, num_classes=10, image_size=32, depth=10, widen=1)
    silu = create_model("wideresnet", in_channels=3, num_classes=10, image_size=32, depth=10, widen=1,
                        activation="silu", bn_momentum=0.01)
    silu.load_state_dict(relu.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(relu.eval()(x), silu.eval()(x))  # same weights, another activation
    assert all(m.momentum == 0.01 for m in silu.modules() if isinstance(m, torch.nn.BatchNorm2d))
    cfg = load_config("recipes/extra/wang2023_wrn28_10.toml")
    assert (cfg.model.name, cfg.data.extra_fraction, cfg.defense["trades"].beta, cfg.train.label_smoothing,
            cfg.defense["ema"].decay) == ("wrn28_10_swish", 0.7, 5.0, 0.1, 0.995)
    # "cosinew": OneCycleLR with pct_start 0.025 over the epochs, stepped per epoch: the peak after 0.025 x 400 - 1 steps
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = build_scheduler(opt, TrainConfig(epochs=400, lr=0.2, schedule="onecycle", onecycle_pct=0.025,
                                             schedule_step="epoch"), batches_per_epoch=326)
    rates = []
    for _ in range(400):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(range(400), key=rates.__getitem__) == 9 and rates[9] == pytest.approx(0.2)


def test_extra_images_stream_from_webdataset_shards_and_class_folders(shards, folder):
    from regdefense.data.stream import scan_folder, scan_shards

    extra = load_extra(DataConfig(extra=[str(shards / "train"), str(folder / "train")]), (3, 16, 16), 3)
    assert len(extra) == 180 and not extra.pseudo.any()
    by_shard, by_folder = scan_shards(shards / "train", 16), scan_folder(folder / "train", None, 16)[0]
    assert torch.equal(extra.labels, torch.cat([by_shard.y, by_folder.y]))
    got = extra.floats(torch.tensor([95, 3]))  # read by offset from a shard / decoded from a file, per batch
    assert torch.equal(got[0], by_folder.floats(torch.tensor([5]))[0]) and torch.equal(got[1], by_shard.floats(
        torch.tensor([3]))[0])
    assert extra.origin(95) == (str(folder / "train"), 5)
    with pytest.raises(DataError, match="one shard; give the folder"):
        load_extra(DataConfig(extra=[str(next((shards / "train").glob("*.tar")))]), (3, 16, 16), 3)
