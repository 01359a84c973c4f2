"""RegDefenseTrainer(pgd_at) against ART's AdversarialTrainerMadryPGD on the embedded digits: the same model, start
weights, optimizer and PGD settings (ε 0.2, 7 steps of 2.5·ε/7, random start), over several seeds; clean, PGD-20
and official AutoAttack accuracy (mean ± std) and the CPU time of each trainer.

    python benchmarks/art_trainer.py --seeds 5 --epochs 20 --n 200

The same order and start are made equal in tests/test_art.py (full-batch steps, no random start: the weights agree
to float drift); here each trainer draws its own batch order and random starts, as users run them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from art.defences.trainer import AdversarialTrainerMadryPGD
from art.estimators.classification import PyTorchClassifier
from torch import nn

from regdefense.base.config import DataConfig
from regdefense.data.sources import load_data
from regdefense.evaluation.runner import evaluate_model
from regdefense.interop.art import RegDefenseTrainer
from regdefense.models import create_model

EPS, STEPS = 0.2, 7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--n", type=int, default=200, help="test points for PGD-20 and AutoAttack")
    args = ap.parse_args()
    data = load_data(DataConfig(val_fraction=0.0))
    x, y = data.train.floats().numpy(), data.train.y.numpy()
    xt, yt = data.test.floats()[: args.n], data.test.y[: args.n]

    def classifier(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=opt, input_shape=(1, 8, 8),
                                 nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")

    trainers = {
        "RegDefenseTrainer(pgd_at)": lambda clf, seed: RegDefenseTrainer(
            clf, ["pgd_at"], {"threat": {"eps": EPS}, "pgd_at": {"steps": STEPS}}, seed=seed
        ).fit(x, y, nb_epochs=args.epochs, batch_size=128),
        "ART AdversarialTrainerMadryPGD": lambda clf, seed: AdversarialTrainerMadryPGD(
            clf, nb_epochs=args.epochs, batch_size=128, eps=EPS, eps_step=2.5 * EPS / STEPS, max_iter=STEPS
        ).fit(x, y),
    }
    results: dict[str, dict[str, list[float]]] = {k: {"clean": [], "pgd": [], "aa": [], "cpu": []} for k in trainers}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        start = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8).state_dict()
        for name, fit in trainers.items():  # interleaved, from the same start weights
            model = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
            model.load_state_dict(start)
            torch.manual_seed(seed)
            import numpy as np

            np.random.seed(seed)
            cpu = time.process_time()
            fit(classifier(model), seed)
            results[name]["cpu"].append(time.process_time() - cpu)
            rep = evaluate_model(model.eval(), xt, yt, suites=["torchattacks:PGD(eps=0.2, alpha=0.025, steps=20)",
                                                              "autoattack"], eps=EPS, num_classes=10, seed=seed,
                                 checks=False, progress=False)
            rows = {r.suite: r for r in rep.rows if r.kind in ("attack", "group worst case")}
            results[name]["clean"].append(rep.clean)
            results[name]["pgd"].append(next(r.robust for s, r in rows.items() if s.startswith("torchattacks")))
            results[name]["aa"].append(rows["autoattack"].robust)
            print(f"seed {seed} {name}: clean {rep.clean:.3f} PGD-20 {results[name]['pgd'][-1]:.3f} "
                  f"AutoAttack {results[name]['aa'][-1]:.3f} cpu {results[name]['cpu'][-1]:.1f} s", flush=True)

    def ms(v: list[float], pct: bool = True) -> str:
        k = 100 if pct else 1
        sd = statistics.stdev(v) * k if len(v) > 1 else float("nan")
        return f"{statistics.mean(v) * k:.2f} ± {sd:.2f}"

    print(f"\nPGD-7 AT on {len(x)} digits, {args.epochs} epochs, seeds 0..{args.seeds - 1}; {args.n} test points, "
          f"ε {EPS}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| trainer | clean % | PGD-20 % | AutoAttack % | CPU s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {ms(r['clean'])} | {ms(r['pgd'])} | {ms(r['aa'])} | {ms(r['cpu'], False)} |")
    ours, art = (statistics.mean(results[k]["cpu"]) for k in trainers)
    print(f"\nCPU time, ART / RegDefenseTrainer: {art / ours:.2f}x")


if __name__ == "__main__":
    main()
