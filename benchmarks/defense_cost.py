"""Per-epoch cost of every defense and stack relative to PGD-10 AT, measured interleaved in one run.

Same data (embedded digits), model (digits_cnn), batch size and seed for all; burn-ins and warm-ups are
set to 0 so every defense does its full work from the first epoch. The time is the training loop only
(attack, loss, update), as logged in `epoch_seconds`; held-out checks are excluded.

    python benchmarks/defense_cost.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics

import torch

from regdefense.host.discovery import activate
from regdefense.training.loop import Trainer
from regdefense.training.run import load_config

STACKS = [["pgd_at"], [], ["fast_at"], ["fgsm_pgk"], ["fgsm_pgk", "ema"], ["trades"], ["mart"], ["lbgat"],
          ["pgd_at", "awp"], ["trades", "awp"], ["pgd_at", "gairat"], ["pgd_at", "mail"], ["trades", "mail"],
          ["pgd_at", "ema"], ["fgsm_pgk", "regmix"], ["pgd_at", "atwr"], ["pgd_at", "atgr"], ["eatr"]]
FULL_POWER = {"awp": ["awp.warmup_epochs=0"], "gairat": ["gairat.burn_in_epochs=0"], "mail": ["mail.burn_in_epochs=0"],
              "eatr": ["eatr.pgd_steps=10", "eatr.cw_steps=20"]}  # EATR at the CPU recipes' sizes


def make(stack: list[str], seed: int) -> Trainer:
    ov = ["train.epochs=1000", "train.progress=false", "train.device=cpu", f"train.seed={seed}",
          "eval.val_samples=8", "eval.pgd_steps=1", "eval.co_guard=off"]
    for name in stack:
        ov += FULL_POWER.get(name, [])
    cfg = load_config(defenses=stack, overrides=ov)
    return Trainer(cfg, pm=activate(stack, cfg.defense))


def one_epoch(trainer: Trainer) -> float:
    trainer.config.train.epochs = trainer.state.epoch + 1
    return trainer.fit()[-1]["epoch_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    trainers = {"+".join(s) or "clean (no defense)": make(s, args.seed) for s in STACKS}
    for t in trainers.values():  # warm-up epoch, not timed
        one_epoch(t)
    times = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for name, t in trainers.items():
            times[name].append(one_epoch(t))
    base = statistics.median(times["pgd_at"])
    n = next(iter(trainers.values())).train_size
    print(f"Per-epoch training cost on the embedded digits ({n} images, digits_cnn, batch 128), {args.rounds} "
          f"interleaved rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'defense / stack':22s} {'s/epoch':>8s} {'vs PGD-10 AT':>13s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} {med:8.3f} {med / base:12.2f}x")


if __name__ == "__main__":
    main()
