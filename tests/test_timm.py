"""timm architectures by name: in a stack with a guide network, as an evaluation target, and with local weights."""

import pytest
import torch

from regdefense.base.errors import ConfigError
from regdefense.models import create_model

timm = pytest.importorskip("timm")


def test_a_timm_model_trains_and_evaluates_in_a_stack_with_a_timm_guide(tmp_path):
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    run = train(defenses=["lbgat"], overrides=["model.name=timm:resnet10t", "lbgat.guide=timm:convnext_atto",
                                               "lbgat.steps=1", "train.epochs=1", "data.limit=64", "train.batch_size=32",
                                               "eval.pgd_steps=1", "eval.test_samples=16", "eval.val_samples=16",
                                               "train.progress=false"], out=tmp_path / "run", echo=lambda s: None)
    from regdefense.base import checkpoint

    payload = checkpoint.load(run.run_dir / "checkpoints" / "last.pt")
    assert any(k.startswith("net.") for k in payload["model"])  # the timm network, behind our input adapter
    guide = payload["modules"]["lbgat_guide"]
    assert any("stages" in k for k in guide)  # ConvNeXt's stages: the guide is the timm architecture asked for
    report, _ = evaluate(run.run_dir, n=16, checks=False, progress=False)
    assert report.meta["stack"] == ["lbgat"] and 0 <= report.worst_case <= report.clean <= 1


def test_transformers_get_the_data_size_and_small_images_are_resized_inside():
    vit = create_model("timm:vit_tiny_patch16_224", in_channels=1, num_classes=10, image_size=8, input_size=32)
    assert vit.net.patch_embed.img_size == (32, 32) and vit(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    cnn = create_model("timm:resnet10t", in_channels=3, num_classes=7, image_size=8)
    assert cnn(torch.rand(2, 3, 8, 8)).shape == (2, 7)  # a stride-32 network on 8-px inputs: resized to 32 inside


def test_pretrained_weights_from_a_local_file_offline(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=1000)  # like ImageNet weights: a 1000-class head
    save_file(source.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    model = create_model("timm:resnet10t", in_channels=3, num_classes=10, image_size=32,
                         weights=str(tmp_path / "resnet10t.safetensors"))
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in body.items())  # every body weight from the file
    assert loaded["fc.weight"].shape == (10, 512)  # a new head for this data's classes
    mean = torch.tensor(model.net.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize.mean, mean)  # the weights' normalisation sits inside: inputs stay in [0,1]


def test_bad_timm_names_and_options_say_what_to_do():
    with pytest.raises(ConfigError, match="timm has no model 'convnxt_tiny'"):
        create_model("timm:convnxt_tiny", in_channels=3, num_classes=10, image_size=32)
    with pytest.raises(ConfigError, match="model.weights loads a local file into a timm model"):
        create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8, weights="w.safetensors")
    with pytest.raises(ConfigError, match="timm:NAME"):
        create_model("resnet_nope", in_channels=1, num_classes=10, image_size=8)
