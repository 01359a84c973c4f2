"""Images per second of the `autoattack` suite (the official code) next to `autoattack-ta` (torchattacks' components)
on the default model (PGD-AT digits_cnn on the embedded digits), same points, ε and seed.

Trains the default model first (about 25 s on a 2-core CPU) unless --run points at an existing run, then
runs each AutoAttack standard cascade on the test split and prints the time and robust accuracy of each component.

    python benchmarks/autoattack_speed.py
    python benchmarks/autoattack_speed.py --run runs/20261121-210534-pgd_at --n 200 --independent
"""

from __future__ import annotations

import argparse
import time

import torch

from regdefense.evaluation.runner import evaluate_model, load_target
from regdefense.training.run import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="an existing run directory (default: train the default model first)")
    ap.add_argument("--n", type=int, default=None, help="test points (default: all 360)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--independent", action="store_true",
                    help="also run the official package directly (run_standard_evaluation) on the same points, ε and "
                         "seed, and print how far the autoattack suite's worst case is from it")
    args = ap.parse_args()
    run = args.run
    if run is None:
        run = train(overrides=["train.progress=false"], echo=lambda s: None).run_dir
    t = load_target(run, device=args.device)
    x, y = (t.x[: args.n], t.y[: args.n]) if args.n else (t.x, t.y)
    print(f"AutoAttack standard on {len(y)} test images ({t.meta['dataset']}, {t.meta['model']}, ε={t.default_eps:g}), "
          f"device {t.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    speed = {}
    for suite in ("autoattack", "autoattack-ta"):
        start = time.perf_counter()
        report = evaluate_model(t.model, x, y, suites=[suite], default_eps=t.default_eps, norm=t.norm,
                                num_classes=t.num_classes, device=t.device, checks=False, progress=False, seed=0)
        total = time.perf_counter() - start
        speed[suite] = len(y) / total
        print(f"\n{suite}\n{'component':28s} {'seconds':>8s} {'robust after':>13s}")
        for r in report.rows:
            if r.kind == "cascade step":
                print(f"{r.label:28s} {r.seconds:8.1f} {100 * r.robust:12.2f}%")
        print(f"{'total':28s} {total:8.1f} {100 * report.worst_case:12.2f}%   -> {speed[suite]:.1f} images/s")
        if suite == "autoattack":
            ours = report.worst_case
    print(f"\nofficial / torchattacks speed: {speed['autoattack'] / speed['autoattack-ta']:.2f}x")
    if args.independent:
        from pyautoattack import AutoAttack

        official = AutoAttack(t.model, norm="Linf" if t.norm == "linf" else "L2", eps=t.default_eps,
                              version="standard", seed=0, device=t.device)
        official.verbose = False
        if t.num_classes < 10:
            official.apgd_targeted.n_target_classes = official.fab.n_target_classes = t.num_classes - 1
        adv, _ = official.run_standard_evaluation(x.to(t.device), y.to(t.device), batch_size=256)
        with torch.no_grad():
            theirs = float((t.model(adv.to(t.device)).argmax(1).cpu() == y).float().mean())
        print(f"independent official run_standard_evaluation: {100 * theirs:.2f}% vs the autoattack suite's "
              f"{100 * ours:.2f}% ({100 * abs(theirs - ours):.2f} points apart)")


if __name__ == "__main__":
    main()
