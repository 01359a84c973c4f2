"""Carmon et al. 2019's RST protocol on the embedded digits: does pseudo-labelled extra data help adversarial training?

    python benchmarks/rst_digits.py                      # 250 labelled, 3 seeds, AutoAttack on the 360 test points
    python benchmarks/rst_digits.py --labelled 250 --seeds 0 1 2 --out runs/rst

Only the first ``--labelled`` images of the digits training split keep their labels (a folder dataset:
``OUT/data/labelled/train.npz`` and the digits test split as ``test.npz``); the other training images become
``OUT/data/unlabelled.npz`` without labels. A clean teacher (``digits_cnn``, no defense, seed 0) trains on the
labelled part and pseudo-labels the rest (``data.teacher``; cached). Then ``regdefense sweep`` runs, over the seeds,
PGD-AT on the labelled part alone (``baseline``), the same for as many optimizer steps as the extra-data run takes
(``baseline_steps``: with half of each batch extra, an epoch over the labelled images has twice the batches), and
PGD-AT with the pseudo-labelled images as half of every batch (``rst``: ``data.extra``, ``data.extra_fraction = 0.5``
— RST's own share), each evaluated with the official AutoAttack (``--attacks autoattack``). Prints the teacher's pseudo-label
accuracy and the table: clean, PGD-20 (the final table's torchattacks PGD) and AutoAttack, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

RECIPE = """# written by benchmarks/rst_digits.py
defenses = ["pgd_at"]

[data]
name = "{data}"
{extra}
[model]
name = "digits_cnn"

[threat]
eps = 0.2

[train]
epochs = {epochs}
batch_size = 32
lr = 0.05
schedule = "cosine"

[defense.pgd_at]
steps = 10
attack_mode = "eval"
"""


def make_data(out: Path, labelled: int) -> tuple[Path, Path, np.ndarray]:
    from regdefense.base.config import DataConfig
    from regdefense.data.sources import load_data

    data = load_data(DataConfig(val_fraction=0.0))
    to_u8 = lambda x: (x[:, 0].numpy() * 255).round().astype(np.uint8)  # noqa: E731
    folder = out / "data" / "labelled"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=to_u8(data.train.x[:labelled]), y=data.train.y[:labelled].numpy())
    np.savez(folder / "test.npz", x=to_u8(data.test.x), y=data.test.y.numpy())
    np.savez(out / "data" / "unlabelled.npz", x=to_u8(data.train.x[labelled:]))  # no labels
    return folder, out / "data" / "unlabelled.npz", data.train.y[labelled:].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labelled", type=int, default=250)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--out", default="runs/rst")
    ap.add_argument("--n", type=int, help="evaluate only the first N test points")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    folder, unlabelled, truth = make_data(out, args.labelled)

    teacher = out / "teacher"
    if not (teacher / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "regdefense", "train", "--defense", "none", "--dataset", str(folder),
                        "--model", "digits_cnn", "--epochs", "60", "--seed", "0", "--out", str(teacher), "--quiet",
                        "-o", "train.batch_size=32", "-o", "train.lr=0.05"], check=True, stdout=subprocess.DEVNULL)
    recipes = out / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / "baseline.toml").write_text(RECIPE.format(data=folder, extra="", epochs=args.epochs))
    n_train = args.labelled - round(0.1 * args.labelled)  # data.val_fraction 0.1 is held out
    per_epoch_rst = -(-n_train // (32 - int(32 * args.fraction)))
    steps_epochs = -(-args.epochs * per_epoch_rst // -(-n_train // 32))
    (recipes / "baseline_steps.toml").write_text(RECIPE.format(data=folder, extra="", epochs=steps_epochs))
    (recipes / "rst.toml").write_text(RECIPE.format(
        data=folder, epochs=args.epochs,
        extra=f'extra = ["{unlabelled}"]\nextra_fraction = {args.fraction}\nteacher = "{teacher}"\n'))

    from regdefense.base.config import DataConfig
    from regdefense.training.extra import load_extra

    extra = load_extra(DataConfig(extra=[str(unlabelled)], teacher=str(teacher)), (1, 8, 8), 10, device="cpu")
    agree = float((extra.labels.numpy() == truth).mean())
    teacher_clean = json.loads((teacher / "summary.json").read_text())["table"][0]["clean"]
    print(f"teacher: {args.labelled} labelled digits, test clean {100 * teacher_clean:.2f}%; pseudo-labels of the "
          f"{len(truth)} unlabelled training images {100 * agree:.2f}% correct")

    cmd = [sys.executable, "-m", "regdefense", "sweep", str(recipes / "baseline.toml"),
           str(recipes / "baseline_steps.toml"), str(recipes / "rst.toml"),
           "--seeds", *map(str, args.seeds), "--out", str(out / "sweep"), "--attacks", "autoattack"]
    if args.n:
        cmd += ["--n", str(args.n)]
    print("$ " + " ".join(cmd[2:]).replace(sys.executable, "python"))
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
