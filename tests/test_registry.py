"""The one registry helper and the dataset registry: adding a dataset is one entry, in code or from another package."""

import warnings

import pytest
import torch
from click.testing import CliRunner

from regdefense.base.config import DataConfig
from regdefense.base.errors import ConfigError, DataError
from regdefense.base.registry import Registry
from regdefense.cli import cli
from regdefense.data.registry import DATASETS
from regdefense.data.sources import load_data
from regdefense.models import default_model

SHAPES_PACKAGE = '''
"""A throwaway third-party dataset: 6×6 images of a bar in one of three places (the class)."""
import torch
from regdefense.data.registry import DatasetSpec, Split

def _make(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.1 * torch.rand(n, 1, 6, 6, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, :, 2 * c : 2 * c + 2] += 0.8
    return Split(x.clamp(0, 1), y)

def _load(cfg):
    return _make(96, 0), _make(30, 1)

BARS = DatasetSpec("bars", _load, (1, 6, 6), 3, 0.15, augment="crop", model="digits_cnn", about="a test's own")
'''


@pytest.fixture
def bars(make_dist):
    make_dist("regdefense-bars", {"thirdparty_bars": SHAPES_PACKAGE}, {"bars": "thirdparty_bars:BARS"},
              group="regdefense.datasets")


def test_a_dataset_from_another_package_is_one_entry_everywhere(bars, tmp_path):
    data = load_data(DataConfig(name="bars", val_fraction=0.0))
    assert data.input_shape == (1, 6, 6) and data.num_classes == 3 and len(data.test) == 30
    assert data.default_eps == 0.15 and data.augment == "crop"  # data.augment=auto follows the entry
    assert default_model("bars", 6) == "digits_cnn"  # model.name=auto follows the entry, not the image size
    listing = CliRunner().invoke(cli, ["datasets"])
    assert listing.exit_code == 0 and "bars" in listing.output and "1×6×6" in listing.output
    # and a run trains on it by name alone: ε, augmentation and architecture from the entry
    from regdefense.training.run import train

    said: list[str] = []
    res = train(None, overrides=["data.name=bars", "train.epochs=1", "train.progress=false", "eval.val_samples=8",
                                 "eval.pgd_steps=1", "eval.test_samples=8", "train.device=cpu"],
                out=tmp_path / "run", echo=said.append)
    from regdefense.base import checkpoint

    state = checkpoint.load(res.run_dir / "checkpoints" / "last.pt")
    assert state["model"]["0.weight"].shape[1] == 1  # digits_cnn's first conv, for the entry's 1 channel
    assert not any("model.name=auto" in m for m in said)  # the entry names the model: nothing to guess aloud
    assert res.history[-1]["eps"] == pytest.approx(0.15)


def test_unknown_names_say_what_is_registered():
    with pytest.raises(DataError, match=r"unknown dataset 'cifar11' \(did you mean 'cifar10'\?\).*or a folder path"):
        load_data(DataConfig(name="cifar11"))
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"} <= set(DATASETS.names())


@pytest.mark.filterwarnings("ignore:widget 'broken'")
def test_the_registry_keeps_built_ins_first_and_skips_a_broken_package(make_dist):
    reg: Registry[object] = Registry("widget", "regdefense.widgets", error=ConfigError)
    reg.register("digits", "built-in")
    make_dist("regdefense-widgets", {"thirdparty_widgets": "OK = 'third'\n"},
              {"digits": "thirdparty_widgets:OK", "fine": "thirdparty_widgets:OK", "broken": "thirdparty_widgets:NOPE"},
              group="regdefense.widgets")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = reg.all()
    assert found == {"digits": "built-in", "fine": "third"}  # a built-in name wins; the broken entry is left out
    assert any("widget 'broken'" in str(w.message) and "failed to load" in str(w.message) for w in caught)
    assert reg.get("fine") == "third" and "fine" in reg and reg.names() == ["digits", "fine"]
    with pytest.raises(ConfigError, match=r"unknown widget 'fin' \(did you mean 'fine'\?\)"):
        reg.get("fin")


def test_the_embedded_digits_entry_loads_what_it_declares():
    spec = DATASETS.get("digits")
    train, test = spec.load(DataConfig(name="digits"))
    assert tuple(test.shape[1:]) == spec.shape and int(torch.cat([train.y, test.y]).max()) + 1 == spec.num_classes
    assert len(train) + len(test) == 1797 and len(test) == 360
