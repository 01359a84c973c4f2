"""Wall time of RegDefenseTrainer(pgd_at) against ART's AdversarialTrainerMadryPGD, same data, model, epochs and
PGD settings (ε 0.2, 7 steps of 2.5·ε/7, random start), interleaved in one process.

    python benchmarks/art_trainer.py --epochs 5 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def main() -> None:
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    from regdefense.art import RegDefenseTrainer
    from regdefense.config import DataConfig
    from regdefense.data import load_data
    from regdefense.models import create_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data = load_data(DataConfig(val_fraction=0.0))
    x, y = data.train.floats().numpy(), data.train.y.numpy()

    def classifier():
        torch.manual_seed(0)
        model = create_model("digits_cnn", in_channels=1, num_classes=10, image_size=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=opt, input_shape=(1, 8, 8),
                                 nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")

    def ours():
        RegDefenseTrainer(classifier(), ["pgd_at"], {"threat": {"eps": 0.2}, "pgd_at": {"steps": 7}}).fit(
            x, y, nb_epochs=args.epochs, batch_size=128)

    def art():
        AdversarialTrainerMadryPGD(classifier(), nb_epochs=args.epochs, batch_size=128, eps=0.2,
                                   eps_step=2.5 * 0.2 / 7, max_iter=7).fit(x, y)

    times = {"RegDefenseTrainer(pgd_at)": [], "ART AdversarialTrainerMadryPGD": []}
    for _ in range(args.rounds):
        for name, fn in zip(times, (ours, art)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"PGD-7 AT, {len(x)} digits, {args.epochs} epochs, {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, t in med.items():
        print(f"{name:32s} {t:7.2f} s")
    print(f"speed-up of RegDefenseTrainer: {med['ART AdversarialTrainerMadryPGD'] / med['RegDefenseTrainer(pgd_at)']:.2f}x")


if __name__ == "__main__":
    main()
