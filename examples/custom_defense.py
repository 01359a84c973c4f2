"""Stack a defense of your own on PGD-AT without packaging it: a weight-norm penalty as a loss wrapper.

The penalty never names PGD-AT: it wraps whatever objective is active and adds a term, so the same
class stacks on any base defense. Runs on the embedded digits in about ten seconds on a laptop CPU.

    python examples/custom_defense.py --epochs 10
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from regdefense import hookimpl, option
from regdefense.host.defense import Defense
from regdefense.host.discovery import activate
from regdefense.training.loop import Trainer
from regdefense.training.run import load_config


class WeightPenalty(Defense):
    """Adds λ·Σ‖W‖² over the model's weight tensors (not biases) as its own logged loss term."""

    name = "weight_penalty"

    @dataclass
    class Config:
        lam: float = option(1e-3, "penalty weight", ge=0)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model, phase):
        terms = yield
        terms["weight_l2"] = self.config.lam * sum((p ** 2).sum() for n, p in model.named_parameters()
                                                   if n.endswith("weight"))
        return terms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    cfg = load_config(defenses=["pgd_at"], overrides=[f"train.epochs={args.epochs}", "train.progress=false"])
    trainer = Trainer(cfg, pm=activate(["pgd_at", WeightPenalty()], cfg.defense))
    for m in trainer.fit():
        print(f"epoch {m['epoch']:2d}  task {m['loss_task']:.3f}  weight_l2 {m['loss_weight_l2']:.4f}  "
              f"held-out clean {m['val_clean']:.1%}  PGD-20 {m['val_robust']:.1%}")


if __name__ == "__main__":
    main()
