"""An ART user's workflow end to end, on the embedded digits (CPU, under a minute):

data → PyTorchClassifier → RegDefenseTrainer with the stack dynat + trades + awp → ART's PGD → accuracy.

    python examples/art_pipeline.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier

from regdefense.base.config import DataConfig
from regdefense.data.sources import load_data
from regdefense.interop.art import RegDefenseTrainer
from regdefense.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)

    # 1. data as numpy arrays, the way ART users hold it
    data = load_data(DataConfig(val_fraction=0.0))
    x_train, y_train = data.train.floats().numpy(), np.eye(10)[data.train.y.numpy()]
    x_test, y_test = data.test.floats().numpy(), data.test.y.numpy()

    # 2. an ART classifier around a plain torch model (BatchNorm inside: the dynamic-label stack needs it)
    model = create_model("digits_cnn_bn", in_channels=1, num_classes=10, image_size=8)
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   clip_values=(0.0, 1.0), device_type="cpu")

    # 3. a regdefense stack as an ART trainer: DYNAT-AWP (TRADES objective, AWP, dynamic labels from a guide)
    trainer = RegDefenseTrainer(classifier, defenses=["trades", "awp", "dynat"], configs={
        "threat": {"eps": 0.2},
        "train": {"eps_warmup_epochs": 5},
        "trades": {"beta": 1.0, "steps": 7},
        "awp": {"warmup_epochs": 3},
        "dynat": {"guide": "digits_cnn_bn", "target_weight": 0.2, "awp_probe_robust_factor": 6.0},
    })
    trainer.fit(x_train, y_train, nb_epochs=args.epochs, batch_size=128)

    # 4. ART's own PGD against the trained classifier
    attack = ProjectedGradientDescent(trainer.get_classifier(), eps=0.2, eps_step=0.025, max_iter=20, verbose=False)
    x_adv = attack.generate(x_test)
    clean = (trainer.predict(x_test).argmax(1) == y_test).mean()
    robust = (trainer.predict(x_adv).argmax(1) == y_test).mean()
    print(f"clean accuracy {clean:.2%}, ART PGD-20 (eps 0.2) accuracy {robust:.2%}, "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
