"""The model zoo: every architecture builds for the dataset's channels, classes and size, and runs."""

import pytest
import torch

from regdefense.base.errors import ConfigError
from regdefense.models import Normalize, create_model, list_models


@pytest.mark.parametrize("name, channels, size", [
    ("digits_cnn", 1, 8), ("small_cnn", 1, 28), ("resnet18", 3, 32), ("resnet34", 3, 16),
    ("resnet50_cifar", 3, 16), ("preact_resnet18", 3, 16), ("resnet50", 1, 8), ("alexnet", 1, 8),
    ("mobilenet_v2", 3, 16), ("densenet121", 1, 8), ("inception_v3", 3, 16), ("resnet101", 3, 8),
])
def test_architectures_map_inputs_to_logits(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_wideresnet_depth_and_width():
    model = create_model("wideresnet", in_channels=3, num_classes=10, image_size=32, depth=16, widen=2)
    assert model.linear.in_features == 128
    with pytest.raises(ConfigError, match="6n\\+4"):
        create_model("wideresnet", in_channels=3, num_classes=10, image_size=32, depth=15)
    assert sum(p.numel() for p in create_model("wrn34_10", in_channels=3, num_classes=10,
                                               image_size=32).parameters()) == pytest.approx(46.16e6, rel=0.01)


def test_normalisation_lives_in_the_model():
    model = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8, normalize=([0.5], [0.25]))
    norm = model[0]
    assert isinstance(norm, Normalize)
    x = torch.full((1, 1, 8, 8), 0.75)
    assert torch.allclose(norm(x), torch.ones_like(x))
    assert "0.mean" in model.state_dict()


def test_unknown_model_and_bad_options():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet19'.*did you mean"):
        create_model("resnet19", in_channels=3, num_classes=10, image_size=32)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8, pretrained=True)
    with pytest.raises(ConfigError, match="at least 16"):
        create_model("small_cnn", in_channels=1, num_classes=10, image_size=8)
    assert {"digits_cnn", "small_cnn", "resnet18", "wideresnet", "inception_v3"} <= set(list_models())
