import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest_plugins = ["regdefense.testing"]

# under pytest-xdist (`-n 2`) each worker gets its share of the cores, so two workers do not fight over them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))
# clean surrogates of the transfer check are cached per dataset: one for the whole session, never in the user's cache
os.environ.setdefault("REGDEFENSE_CACHE", tempfile.mkdtemp(prefix="regdefense-cache-"))

ROOT = Path(__file__).resolve().parent.parent

NOISE_PLUGIN = '''
"""Gaussian-noise augmentation: a throwaway third-party defense for tests."""
from dataclasses import dataclass
import torch
from regdefense import hookimpl, option

class GaussNoise:
    name = "gauss_noise"

    @dataclass
    class Config:
        sigma: float = option(0.1, "noise std", ge=0)

    def __init__(self, config):
        self.config = config
        self.calls = 0

    @hookimpl
    def regdefense_make_adversarial(self, step):
        self.calls += 1
        return (step.inputs + self.config.sigma * torch.randn_like(step.inputs)).clamp(0, 1)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]
'''


@pytest.fixture(autouse=True)
def _own_ledgers(tmp_path_factory, monkeypatch):
    """Each test its own best-known ledgers: two tests evaluating bit-identical weights must not share attacks."""
    monkeypatch.setenv("REGDEFENSE_LEDGER", str(tmp_path_factory.mktemp("ledgers")))


@pytest.fixture
def gauss_dist(make_dist):
    """A third-party distribution 'regdefense-gauss' providing the defense 'gauss_noise'."""
    return make_dist("regdefense-gauss", {"thirdparty_gauss": NOISE_PLUGIN}, {"gauss_noise": "thirdparty_gauss:GaussNoise"})


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """Create a throwaway installed distribution (a package plus its .dist-info with entry points)
    in a fresh folder on sys.path, visible through importlib.metadata like a pip-installed one."""

    def make(dist: str, modules: dict[str, str], entry_points: dict[str, str], version: str = "1.0",
             group: str = "regdefense") -> Path:
        site = tmp_path / f"site-{dist}"
        site.mkdir()
        for name, source in modules.items():
            (site / f"{name}.py").write_text(source)
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{group}]\n{eps}\n")
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
        return site

    yield make
    for name in [m for m in sys.modules if m.startswith("thirdparty_")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory):
    """A PGD-AT and a clean digits_cnn trained on the embedded digits for 30 epochs, as the default run (about 30 s
    together), a clean 'surrogate' of another seed trained 10 epochs (the transfer check's), with the data. (At 20
    epochs the PGD-AT model's PGD-20 accuracy was 3.5 points above PGD-100 × 3 restarts under torch 2.14, which the
    convergence check rightly flags.)"""
    from regdefense.host.discovery import activate
    from regdefense.training.loop import Trainer
    from regdefense.training.run import load_config

    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same models with or without xdist: float sums depend on the thread count
    for name, stack, epochs, seed in (("pgd_at", ["pgd_at"], 30, 0), ("clean", [], 30, 0), ("surrogate", [], 10, 1)):
        cfg = load_config(defenses=stack, overrides=[f"train.epochs={epochs}", "train.progress=false", "train.device=cpu",
                                                     "eval.val_samples=32", "eval.pgd_steps=1", f"train.seed={seed}"])
        trainer = Trainer(cfg, pm=activate(stack, cfg.defense))
        trainer.fit()
        out[name] = trainer.raw_model.eval()
        out["data"] = trainer.data
    torch.set_num_threads(threads)
    return out
