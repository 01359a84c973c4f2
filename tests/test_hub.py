"""Models in and out without a network: a push into a local huggingface_hub cache, ``hf:`` targets read back in
offline mode, and RobustBench zoo models built and loaded by the robustbench package from a local weights file."""

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from regdefense.base.errors import UserError
from regdefense.cli import cli
from regdefense.training.run import train

COMMON = ["train.progress=false", "train.device=cpu", "eval.val_samples=32", "eval.pgd_steps=1", "data.limit=200"]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf-cache"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from regdefense.evaluation.runner import evaluate

    out = tmp_path_factory.mktemp("hub") / "run"
    run_dir = train(defenses=["pgd_at"], overrides=[*COMMON, "train.epochs=2", "train.seed=3"], out=out,
                    echo=lambda s: None).run_dir
    evaluate(run_dir, suites=["torchattacks:FGSM(eps=0.2)"], n=16, checks=False, progress=False, device="cpu")
    return run_dir


def test_a_push_to_the_local_cache_loads_back_offline_bit_for_bit(run, offline_hub):
    from regdefense.evaluation.runner import load_target
    from regdefense.interop.hub import push

    result = CliRunner().invoke(cli, ["push", str(run), "lab/digits-pgd", "--to-cache"])
    assert result.exit_code == 0, result.output
    repo = offline_hub / "models--lab--digits-pgd"
    commit = (repo / "refs" / "main").read_text()
    assert sorted(p.name for p in (repo / "snapshots" / commit).iterdir()) == ["README.md", "config.json",
                                                                              "model.safetensors"]
    card = (repo / "snapshots" / commit / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert "library_name: regdefense" in card and "stack `pgd_at`" in card and "| seed | 3 |" in card
    assert "| `pgd_at` settings | " in card and "steps=10" in card  # the recipe
    assert f"{100 * summary['table'][0]['robust']:.2f}%" in card  # the final table
    assert "FGSM" in card and "s wall" in card  # the evaluate report and the cost
    import yaml  # the Hub reads the front matter as YAML: its model-index carries the report's figures

    meta = yaml.safe_load(card.split("---")[1])
    report = json.loads((run / "eval" / "report.json").read_text())
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    worst = next(r for r in report["rows"] if r["kind"] == "worst case")["robust"]
    assert metrics == {"accuracy": round(100 * report["clean"], 2), "robust-accuracy": round(100 * worst, 2)}

    hub = load_target("hf:lab/digits-pgd", device="cpu")
    local = load_target(run, device="cpu")
    assert hub.meta["stack"] == ["pgd_at"] and hub.default_eps == local.default_eps
    with torch.no_grad():
        assert torch.equal(hub.model(local.x), local.model(local.x))

    # the same through the CLI, and as a starting point for training
    res = CliRunner().invoke(cli, ["evaluate", "hf:lab/digits-pgd", "--n", "16", "--attacks", "torchattacks:FGSM(eps=0.2)",
                                   "--no-checks", "--quiet", "--json", "--out", str(run.parent / "hf-eval")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["meta"]["target"] == "hf:lab/digits-pgd"
    from regdefense.training.loop import Trainer
    from regdefense.training.run import load_config

    trainer = Trainer(load_config(overrides=[*COMMON, "train.init=hf:lab/digits-pgd"]))
    from regdefense.base import checkpoint

    state = checkpoint.load(run / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(v, state[k]) for k, v in trainer.raw_model.state_dict().items())

    # a second push replaces what the revision points at
    again = push(run, "lab/digits-pgd", to_cache=True, which="last")
    assert again["revision"] == "main" and (repo / "refs" / "main").read_text() != commit


def test_hub_errors_say_what_to_do(run, offline_hub):
    from regdefense.evaluation.runner import load_target
    from regdefense.interop.hub import push

    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_target("hf:lab/never-pushed", device="cpu")
    with pytest.raises(UserError, match="hf:ORG/NAME"):
        load_target("hf:just-a-name", device="cpu")
    with pytest.raises(UserError, match="pushing to lab/x failed.*--to-cache"):
        push(run, "lab/x")  # offline: the upload cannot happen, and says so


ZOO = "robustbench:Wong2020Fast"


@pytest.fixture
def zoo_weights(tmp_path, monkeypatch):
    """RobustBench's Wong2020Fast architecture, built by the robustbench package, with random weights saved where
    its loader looks (as the zoo's checkpoints are: a 'state_dict' with DataParallel's 'module.' prefix)."""
    from regdefense.models.robustbench_zoo import architecture

    monkeypatch.setenv("ROBUSTBENCH_MODELS", str(tmp_path / "zoo"))
    torch.manual_seed(0)
    net = architecture(ZOO, num_classes=10).eval()
    path = tmp_path / "zoo" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net


def test_a_robustbench_zoo_model_loads_from_a_local_weights_file(zoo_weights, tmp_path):
    import numpy as np

    from regdefense.interop.export import read_weights
    from regdefense.models.robustbench_zoo import load

    assert type(zoo_weights).__module__.startswith("robustbench.")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(ZOO)(x), zoo_weights(x))
    source, state = read_weights(ZOO)
    assert source == ZOO and all(torch.equal(state[k], v) for k, v in zoo_weights.state_dict().items())

    # the zoo's architecture trains like any model, starting from the zoo weights (--init robustbench:NAME)
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny32"
    data.mkdir()
    for split, n in (("train", 16), ("test", 8)):
        np.savez(data / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10)
    from regdefense.training.loop import Trainer
    from regdefense.training.run import load_config

    cfg = load_config(overrides=["train.device=cpu", "train.progress=false", f"data.name={data}",
                                 f"model.name={ZOO}", f"train.init={ZOO}", "data.val_fraction=0"])
    trainer = Trainer(cfg)
    assert type(trainer.raw_model).__name__ == "Wong2020FastNet"
    assert all(torch.equal(v, state[k]) for k, v in trainer.raw_model.state_dict().items())


def test_robustbench_names_are_checked(zoo_weights):
    from regdefense.models.robustbench_zoo import parse

    assert parse("robustbench:cifar10/Linf/Wong2020Fast") == ("Wong2020Fast", "cifar10", "Linf")
    with pytest.raises(UserError, match="did you mean Wong2020Fast"):
        parse("robustbench:Wong2020")
    with pytest.raises(UserError, match="datasets are"):
        parse("robustbench:mnist/Linf/Wong2020Fast")


def test_robustbench_imports_without_pkg_resources_or_the_autoattack_module(monkeypatch):
    """setuptools 81 removed pkg_resources and pyautoattack installs AutoAttack as 'pyautoattack': the import
    supplies both to robustbench only, and leaves neither behind."""
    from regdefense.models import robustbench_zoo

    saved = {k: v for k, v in sys.modules.items() if k == "robustbench" or k.startswith("robustbench.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # `import pkg_resources` now fails
    try:
        utils, zoo = robustbench_zoo.import_robustbench()
        assert callable(utils.load_model) and zoo
        assert sys.modules.get("pkg_resources") is None and "autoattack" not in sys.modules
    finally:
        for name in [k for k in sys.modules if k == "robustbench" or k.startswith("robustbench.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_models_lists_the_zoo_prefixes_and_the_swish_wideresnets():
    out = CliRunner().invoke(cli, ["models"]).output
    assert "robustbench:NAME" in out and "timm:NAME" in out and "wrn28_10_swish" in out and "wrn70_16_swish" in out


def test_one_call_loads_the_evaluated_model_from_every_target_form(run, offline_hub, tmp_path):
    """regdefense.load_model: a run, an export (safetensors and torch-export), hf: from the local cache, and a
    RobustBench-format checkpoint ({"state_dict": ...} with DataParallel's module. prefixes) — the same logits."""
    import regdefense
    from regdefense.evaluation.runner import load_target
    from regdefense.interop.export import export, load
    from regdefense.interop.hub import push

    t = load_target(run, n=32, device="cpu")
    push(run, "lab/one-call", to_cache=True)
    export(run, fmt="torch-export", out=tmp_path / "pt2")
    rb = tmp_path / "Robust_Digits.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in t.model.state_dict().items()}, "epoch": 2}, rb)
    forms = {
        "run": regdefense.load_model(run),
        "safetensors export": regdefense.load_model(export(run, out=tmp_path / "st")["config"].parent),
        "torch-export": regdefense.load_model(tmp_path / "pt2", trust_code=True),  # programs: code, when trusted
        ".pt2 file": regdefense.load_model(tmp_path / "pt2" / "model.pt2", trust_code=True),
        "hf:": regdefense.load_model("hf:lab/one-call"),
        "export.load(hf:)": load("hf:lab/one-call"),
        "RobustBench-format file": regdefense.load_model(rb, arch="digits_cnn"),
    }
    with torch.no_grad():
        want = t.model(t.x)
        for form, model in forms.items():
            assert not model.training, form
            assert torch.equal(model(t.x), want), form
    import torchattacks  # ready for the attack libraries as returned

    adv = torchattacks.PGD(forms["torch-export"], eps=0.1, alpha=0.05, steps=2)(t.x[:4], t.y[:4])
    assert (adv - t.x[:4]).abs().max() <= 0.1 + 1e-6 and not torch.equal(adv, t.x[:4])
