"""Masked models and what escalation makes of them (issue 35): the best-known row against a white-box attack on the
model under the mask, through the CLI default, each model saved as TorchScript as a user would hand it over.

    python benchmarks/escalation_zoo.py --n 200                 # trains the digits models it needs (a few minutes)
    python benchmarks/escalation_zoo.py --n 200 --models m.pt   # {"clean": net, "surrogate": net} saved by torch.save

Columns: suites' worst case, best known without the escalations (suites + checks), best known with them, the
reference, the wall time of the evaluation (``--off``: also the time of ``--adaptive off``), the escalations run
(name, points broken, seconds).

The zoo (:func:`zoo`) is shared with tests/test_escalation.py. Each masked model wraps the same clean digits_cnn; the
reference is an attack on that network restated here (PGD-50 with the network's own gradient, BPDA written out for
the quantiser and the binariser, EOT-PGD measured by majority vote for the noise), never the code under test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

VOTES = 15  # forward passes behind a randomized model's majority vote


def _onehot(z):
    return F.one_hot(z.argmax(1), z.shape[1]).float()


class Detached(nn.Module):
    """No input gradient at all: the network sees a detached copy of the image."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.detach())


class ZeroGrad(nn.Module):
    """A zero input gradient by construction: the image enters as detach(x) + 0·x."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.detach() + 0 * x)


class OneHotDecoy(nn.Module):
    """One-hot arg-max outputs whose gradient is a random network's (a decoy)."""

    def __init__(self, net, decoy):
        super().__init__()
        self.net, self.decoy = net, decoy

    def forward(self, x):
        d = self.decoy(x)
        return d + (_onehot(self.net(x)) - d).detach()


class OneHotReversed(nn.Module):
    """One-hot arg-max outputs whose gradient is the network's, reversed."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        return -z + (_onehot(z) + z).detach()


class Scaled(nn.Module):
    """Logits × 10⁴: the softmax saturates and CE's gradient underflows."""

    def __init__(self, net, k=1e4):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x):
        return self.net(x) * self.k


class Shattered(nn.Module):
    """x + a·sin(ωx) in front of the network: a forward within a of the image, a wildly oscillating gradient."""

    def __init__(self, net, a=0.03, w=300.0):
        super().__init__()
        self.net, self.a, self.w = net, a, w

    def forward(self, x):
        return self.net((x + self.a * torch.sin(self.w * x)).clamp(0, 1))


class Reversed(nn.Module):
    """The network's logits, its input gradient reversed."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        return -z + (2 * z).detach()


class Quantise(nn.Module):
    def forward(self, x):
        return torch.round(x * 4) / 4


class Binarise(nn.Module):
    def forward(self, x):
        return (x > 0.5).float()


class Noisy(nn.Module):
    """Fresh Gaussian noise on the input at every forward pass."""

    def __init__(self, net, sigma=0.1):
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


class Thermometer(nn.Module):
    """Hard thermometer encoding (Buckman et al. 2018): each pixel becomes ``levels`` bits [x > k/levels], and the
    network reads the bits through a first layer that averages them (a thermometer network with tied weights)."""

    def __init__(self, levels=16):
        super().__init__()
        self.register_buffer("thresholds", torch.arange(levels, dtype=torch.float32) / levels)

    def forward(self, x):
        bits = (x.unsqueeze(-1) > self.thresholds).float()  # a step: no gradient reaches x
        return bits.mean(-1)


class ShiftVote(nn.Module):
    """A vote over random shifts: the softmax averaged over ``votes`` copies of the image, each rolled by one of the
    nine offsets of up to one pixel, drawn afresh at every forward pass (with tensor ops only, so that a traced
    TorchScript copy stays randomized)."""

    def __init__(self, net, votes=4):
        super().__init__()
        self.net, self.votes = net, votes

    def forward(self, x):
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        shifted = torch.stack([torch.roll(x, shifts=o, dims=(2, 3)) for o in offsets], 1)  # B × 9 × C × H × W
        pick = torch.randint(0, len(offsets), (self.votes,), device=x.device)
        logits = self.net(shifted[:, pick].flatten(0, 1))
        probs = torch.softmax(logits, 1).unflatten(0, (-1, self.votes)).mean(1)
        return torch.log(probs + 1e-12)


def random_decoy(net: nn.Module, seed: int = 123) -> nn.Module:
    """The network's architecture with random weights: a gradient that leads nowhere useful."""
    decoy = copy.deepcopy(net)
    torch.manual_seed(seed)
    for p in decoy.parameters():
        nn.init.normal_(p, std=0.1)
    return decoy.eval()


def zoo(net: nn.Module, decoy: nn.Module) -> dict[str, nn.Module]:
    """Every category of issue 35, built cheaply around the clean network ``net``."""
    return {
        "detached forward": Detached(net),
        "zero gradient": ZeroGrad(net),
        "one-hot behind a decoy gradient": OneHotDecoy(net, decoy),
        "one-hot with reversed gradient": OneHotReversed(net),
        "logits ×1e4": Scaled(net),
        "shattered x + a·sin(ωx)": Shattered(net),
        "reversed gradient": Reversed(net),
        "quantised input": nn.Sequential(Quantise(), net),
        "binarised input": nn.Sequential(Binarise(), net),
        "thermometer encoding": nn.Sequential(Thermometer(), net),
        "input noise": Noisy(net),
        "shift votes": ShiftVote(net),
    }


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float()


def _bpda(net, step, masked, x, y, eps, steps=50):
    """PGD through ``step`` with the identity's gradient, written out."""
    alpha = 2.5 * eps / steps
    adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        q = step(adv).requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(q), y), q)
        adv = torch.min(torch.max(adv + alpha * g.sign(), x - eps), x + eps).clamp(0, 1).detach()
    return _acc(masked, adv, y)


def reference(name: str, masked: nn.Module, net: nn.Module, x, y, eps: float) -> float:
    """The white-box attack on the model under the mask, per category, measured on the masked model."""
    torch.manual_seed(0)
    if name == "quantised input":
        return float(_bpda(net, Quantise(), masked, x, y, eps).mean())
    if name == "binarised input":
        return float(_bpda(net, Binarise(), masked, x, y, eps).mean())
    if name == "thermometer encoding":
        return float(_bpda(net, Thermometer(), masked, x, y, eps).mean())
    if name in ("input noise", "shift votes"):
        adv = torchattacks.EOTPGD(masked, eps=eps, alpha=2.5 * eps / 20, steps=20, eot_iter=20)(x, y)
        with torch.no_grad():
            votes = sum(F.one_hot(masked(adv).argmax(1), 10) for _ in range(VOTES))
        return float((votes.argmax(1) == y).float().mean())
    adv = torchattacks.PGD(net, eps=eps, alpha=2.5 * eps / 50, steps=50, random_start=True)(x, y)
    return float(_acc(masked, adv, y).mean())


def _train() -> dict[str, nn.Module]:
    from regdefense.host.discovery import activate
    from regdefense.training.loop import Trainer
    from regdefense.training.run import load_config

    out = {}
    torch.set_num_threads(1)
    for name, epochs, seed in (("clean", 30, 0), ("surrogate", 10, 1)):
        cfg = load_config(defenses=[], overrides=[f"train.epochs={epochs}", "train.progress=false",
                                                  "train.device=cpu", "eval.val_samples=32", "eval.pgd_steps=1",
                                                  f"train.seed={seed}"])
        trainer = Trainer(cfg, pm=activate([], cfg.defense))
        trainer.fit()
        out[name] = trainer.raw_model.eval()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--models", help="a torch.save'd dict with 'clean' (and 'surrogate') digits_cnn modules")
    ap.add_argument("--only", nargs="*", help="zoo names to run (default: all)")
    ap.add_argument("--out", default="escalation_zoo.json")
    ap.add_argument("--off", action="store_true", help="also run each model with --adaptive off (its time)")
    args = ap.parse_args()
    from regdefense.base.config import DataConfig
    from regdefense.data.sources import load_data

    models = torch.load(args.models, weights_only=False) if args.models else _train()
    net = models["clean"].eval()
    decoy = random_decoy(net)
    data = load_data(DataConfig(name="digits"))
    x, y = data.test.floats()[: args.n], data.test.y[: args.n]
    eps = data.default_eps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, masked in zoo(net, decoy.eval()).items():
            if args.only and name not in args.only:
                continue
            masked.eval()
            ref = reference(name, masked, net, x, y, eps)
            path = Path(tmp) / (name.replace(" ", "_").replace("/", "") + ".ts")
            torch.jit.save(torch.jit.trace(masked, x[:2], check_trace=False), path)
            row = {"model": name, "reference": ref}
            for mode in ("auto", "off") if args.off else ("auto",):
                out = Path(tmp) / f"eval-{path.stem}-{mode}"
                cmd = ["regdefense", "evaluate", str(path), "--arch", "torchscript", "--trust-code", "--dataset",
                       "digits", "--n", str(args.n), "--attacks", "quick", "--adaptive", mode, "--quiet",
                       "--out", str(out)]
                started = time.perf_counter()
                env = os.environ | {"REGDEFENSE_LEDGER": str(out) + "-ledger"}  # a ledger of its own per run
                subprocess.run(cmd, check=True, capture_output=True, env=env)
                rep = json.loads((out / "report.json").read_text())
                best = next(r["robust"] for r in rep["rows"] if r["kind"] == "best known")
                by_escalation = [b for b in rep["meta"]["best_known"]["broken_by"].values() if b.startswith("escal")]
                row[mode] = {"suites": rep["worst_case"], "best_known": best,
                             "without_escalations": best + len(by_escalation) / rep["meta"]["n"],
                             "randomized": rep["meta"].get("headline", {}).get("randomized"),
                             "seconds": time.perf_counter() - started,
                             "escalations": [(e["name"], e["broke"], round(e["seconds"], 1))
                                             for e in rep.get("escalations", [])]}
            rows.append(row)
            a = row["auto"]
            off = f" ({row['off']['seconds']:.0f} s off)" if args.off else ""
            vote = f"; majority vote {100 * a['randomized']['majority']:.1f}" if a["randomized"] else ""
            print(f"| {name} | {100 * a['suites']:.1f} | {100 * a['without_escalations']:.1f} | "
                  f"{100 * a['best_known']:.1f}{vote} | {100 * ref:.1f} | {a['seconds']:.0f} s{off} | "
                  f"{a['escalations']} |", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
