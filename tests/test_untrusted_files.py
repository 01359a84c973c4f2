"""Loading is data, not code (issue 32, items 1-3 and 13): a model file from elsewhere never runs code unless the user
says so (``--trust-code`` / ``trust_code=True``).

Each door gets a harmless payload that would create a marker file if it ran: a pickle whose ``__reduce__`` is
``Path.touch(marker)``, or a TorchScript forward that maps the marker file with ``torch.from_file(shared=True)``.
"""

import io
import json
import pathlib
import shutil

import pytest
import torch
from click.testing import CliRunner

import regdefense
from regdefense.base import checkpoint
from regdefense.base.errors import UserError
from regdefense.cli import cli

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

PROGRAM = "is a torch.export program: code that runs when loaded"
SCRIPT = "is a TorchScript program: code that runs when loaded"


class Touch:
    """Unpickled, it creates ``path`` (what a real payload would do is left to the imagination)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


class MapsAFile(torch.nn.Module):
    """A scripted forward that creates (and could overwrite) a file: TorchScript is code."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x):
        mapped = torch.from_file(self.path, shared=True, size=1, dtype=torch.uint8)
        return x.flatten(1)[:, :10] + mapped.float().sum() * 0


def evil_pickle(path, marker) -> pathlib.Path:
    torch.save(Touch(marker), path)
    return path


def evil_pt2(path, marker) -> pathlib.Path:
    """A valid torch.export archive whose sample inputs are a pickle that ``torch.export.load`` unpickles with
    ``weights_only=False`` (after its weights-only attempt fails)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    good = path.with_name("good.pt2")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 8, 8),)), str(good))
    buf = io.BytesIO()
    torch.save(Touch(marker), buf)
    reader = PT2ArchiveReader(str(good))
    with PT2ArchiveWriter(str(path)) as writer:
        for name in reader.get_file_names():
            if name not in (".data/version", ".data/serialization_id", "byteorder"):  # the writer adds these
                writer.write_bytes(name, buf.getvalue() if name.endswith("sample_inputs/model.pt") else
                                   reader.read_bytes(name))
    return path


def export_folder(folder, fmt, marker) -> pathlib.Path:
    """An export folder as `regdefense export` writes it (a complete config.json), holding a payload."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "format": fmt, "architecture": "digits_cnn", "input_shape": [1, 8, 8], "num_classes": 10,
        "dataset": "digits", "threat": {"norm": "linf", "eps": 0.2}, "config": {}, "stack": [],
    }))
    if fmt == "torch-export":
        evil_pt2(folder / "model.pt2", marker)
    else:
        torch.jit.script(MapsAFile(str(marker))).save(str(folder / "model.ts"))
    return folder


def evaluate_cli(*args):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args), "--n", "4", "--no-checks", "--quiet",
                                    "--attacks", "torchattacks:FGSM(eps=0.1)"])


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny real run (one epoch on 64 digits)."""
    from regdefense.training.run import train

    return train(defenses=[], overrides=["train.epochs=1", "data.limit=64", "eval.pgd_steps=1", "eval.test_samples=16",
                                         "eval.val_samples=16", "train.progress=false", "train.device=cpu"],
                 out=tmp_path_factory.mktemp("untrusted") / "run", echo=lambda s: None).run_dir


@pytest.fixture
def timm_run(run, tmp_path, marker):
    """A copy of ``run`` whose config.json and checkpoints (valid checksums) name ``timm:resnet10t`` with
    ``model.weights=evil.pth``."""
    pytest.importorskip("timm")
    evil = evil_pickle(tmp_path / "evil.pth", marker)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(run, poisoned)
    model = {"name": "timm:resnet10t", "weights": str(evil)}
    config = json.loads((poisoned / "config.json").read_text())
    (poisoned / "config.json").write_text(json.dumps(config | {"model": config["model"] | model}))
    for ckpt in (poisoned / "checkpoints").glob("*.pt"):
        payload = checkpoint.load(ckpt)
        payload["config"]["model"] = payload["config"]["model"] | model
        checkpoint.save(payload, ckpt)
    return poisoned


def refused(result, *words):
    return result.exit_code == 2 and all(w in result.output for w in words) and "Traceback" not in result.output


# --- 1. torch.export programs -----------------------------------------------------------------------------------


def test_evaluate_refuses_a_pt2_file_without_trust_code(tmp_path, marker):
    result = evaluate_cli(evil_pt2(tmp_path / "evil.pt2", marker))
    assert refused(result, PROGRAM, "--trust-code"), result.output
    assert not marker.exists()


@pytest.mark.parametrize("fmt, says", [("torch-export", PROGRAM), ("torchscript", SCRIPT)])
def test_evaluate_refuses_an_export_folder_of_a_program_format(tmp_path, marker, fmt, says):
    """The folder's config.json names the format; that is not the user's choice to run code (item 3)."""
    folder = export_folder(tmp_path / "export", fmt, marker)
    result = evaluate_cli(folder)
    assert refused(result, says, "--trust-code"), result.output
    assert not marker.exists()


def test_an_explicit_arch_does_not_imply_trust(tmp_path, marker):
    torch.jit.script(MapsAFile(str(marker))).save(str(tmp_path / "m.ts"))
    assert refused(evaluate_cli(tmp_path / "m.ts", "--arch", "torchscript"), SCRIPT)
    assert refused(evaluate_cli(evil_pt2(tmp_path / "e.pt2", marker), "--arch", "torch-export"), PROGRAM)
    assert not marker.exists()


def test_load_model_refuses_programs(tmp_path, marker):
    for target in (evil_pt2(tmp_path / "evil.pt2", marker), export_folder(tmp_path / "pt2", "torch-export", marker)):
        with pytest.raises(UserError, match="trust_code=True"):
            regdefense.load_model(target)
    with pytest.raises(UserError, match=SCRIPT):
        regdefense.load_model(export_folder(tmp_path / "ts", "torchscript", marker))(torch.rand(2, 1, 8, 8))
    assert not marker.exists()


def test_hf_target_of_a_program_format_is_refused(tmp_path, marker, monkeypatch):
    """``hf:ORG/NAME`` from the local cache (offline), its config.json saying torch-export."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = cache / "models--lab--evil"
    export_folder(repo / "snapshots" / ("0" * 40), "torch-export", marker)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    with pytest.raises(UserError, match=PROGRAM):
        regdefense.load_model("hf:lab/evil")
    assert refused(evaluate_cli("hf:lab/evil", "--out", tmp_path / "eval"), PROGRAM)
    assert not marker.exists()


def test_the_art_bridge_refuses_programs(tmp_path, marker):
    pytest.importorskip("art")
    from regdefense.interop.art import to_art_classifier

    with pytest.raises(UserError, match=PROGRAM):
        to_art_classifier(evil_pt2(tmp_path / "evil.pt2", marker))
    with pytest.raises(UserError, match=SCRIPT):
        to_art_classifier(export_folder(tmp_path / "ts", "torchscript", marker)).predict(torch.rand(2, 1, 8, 8).numpy())
    assert not marker.exists()


def test_init_reads_weights_only(tmp_path, marker):
    """``train --init``: a pickle, a .pt2 file and a torch-export folder are refused (no code runs)."""
    for target, says in ((evil_pickle(tmp_path / "evil.pth", marker), "never unpickled"),
                         (evil_pt2(tmp_path / "evil.pt2", marker), "not a readable checkpoint"),
                         (export_folder(tmp_path / "pt2", "torch-export", marker), "needs its safetensors export")):
        result = CliRunner().invoke(cli, ["train", "--check", "--init", str(target)])
        assert refused(result, says), result.output
    assert not marker.exists()


def test_a_trusted_pt2_export_loads_and_evaluates(run, tmp_path, capsys):
    from regdefense.evaluation.targets import load_target
    from regdefense.interop.export import export, load

    files = export(run, fmt="torch-export", out=tmp_path / "pt2")
    t = load_target(run, n=8, device="cpu")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "pt2", trust_code=True)(t.x), t.model(t.x))
        assert torch.equal(regdefense.load_model(files["weights"], trust_code=True)(t.x), t.model(t.x))
    assert "a torch.export program (code), as trust_code allows" in capsys.readouterr().err
    result = evaluate_cli(tmp_path / "pt2", "--trust-code", "--json")
    assert result.exit_code == 0, result.output
    assert "as trust_code allows" in result.stderr


# --- 2. timm's model.weights=FILE --------------------------------------------------------------------------------


def test_train_check_reads_timm_weights_as_data(tmp_path, marker):
    pytest.importorskip("timm")
    evil = evil_pickle(tmp_path / "evil.pth", marker)
    result = CliRunner().invoke(cli, ["train", "--check", "--model", "timm:resnet10t", "-o", f"model.weights={evil}"])
    assert refused(result, "evil.pth", "never unpickled"), result.output
    assert not marker.exists()


@pytest.mark.parametrize("door", ["evaluate", "export", "resume", "load_model"])
def test_a_checkpoint_naming_timm_weights_runs_no_code(timm_run, marker, door):
    if door == "load_model":
        with pytest.raises(UserError, match="never unpickled"):
            regdefense.load_model(timm_run)
    else:
        args = {"evaluate": ["evaluate", str(timm_run), "--n", "4", "--no-checks", "--quiet"],
                "export": ["export", str(timm_run)],
                "resume": ["train", "--resume", str(timm_run), "-o", "train.epochs=2", "--quiet"]}[door]
        result = CliRunner().invoke(cli, args)
        assert refused(result, "evil.pth", "never unpickled"), result.output
    assert not marker.exists()


def test_timm_weights_from_a_plain_torch_file_still_load(tmp_path):
    timm = pytest.importorskip("timm")
    from regdefense.models import create_model

    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    model = create_model("timm:resnet10t", in_channels=3, num_classes=10, image_size=32,
                         weights=str(tmp_path / "w.pth"))
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if not k.startswith("fc."))
    assert loaded["fc.weight"].shape == (10, 512) and "state_dict" not in model.net.pretrained_cfg


# --- RobustBench's loader ----------------------------------------------------------------------------------------


def test_a_robustbench_zoo_file_is_read_weights_only(tmp_path, marker, monkeypatch):
    """robustbench calls torch.load without weights_only; torch's environment switch must not turn code on."""
    from regdefense.models.robustbench_zoo import load

    monkeypatch.setenv("ROBUSTBENCH_MODELS", str(tmp_path / "zoo"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "zoo" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    evil_pickle(path, marker)
    with pytest.raises(UserError, match="RobustBench could not load"):
        load("robustbench:Wong2020Fast")
    assert not marker.exists()


# --- 13. an export's config.json with keys missing ----------------------------------------------------------------


@pytest.mark.parametrize("drop", ["input_shape", "threat", "architecture", "num_classes"])
def test_an_export_config_with_a_key_missing_is_a_clean_error(run, tmp_path, drop):
    from regdefense.interop.export import export

    files = export(run, out=tmp_path / "st")
    info = json.loads(files["config"].read_text())
    del info[drop]
    files["config"].write_text(json.dumps(info))
    result = evaluate_cli(tmp_path / "st")
    assert refused(result, f"{drop} missing or invalid"), result.output
    with pytest.raises(UserError, match=f"{drop} missing or invalid"):
        regdefense.load_model(tmp_path / "st")
