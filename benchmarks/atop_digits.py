"""AToP on the embedded digits: RT1/RT2/RT3 × (pre-trained purifier only, AToP fine-tuned) × (clean, BPDA-PGD,
full-gradient PGD+EOT), in front of a clean-trained digits_cnn.

    python benchmarks/atop_digits.py --workdir runs/atop --n 200

Every number comes from the attack named in its column; the defended model is randomized, so only the EOT
column is an adaptive, full-gradient number.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "digits"


def main() -> None:
    from regdefense.base.config import DataConfig
    from regdefense.data.sources import load_data
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/atop")
    ap.add_argument("--n", type=int, default=200, help="test points per evaluation")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    work = Path(args.workdir)
    quiet = {"echo": lambda s: None}
    clean = train(str(RECIPES / "clean.toml"), overrides=["train.progress=false"], out=work / "clean", **quiet).run_dir
    print("| transform | purifier | clean | BPDA-PGD-20 | PGD-20 + EOT-20 | fine-tune img/s | EOT eval s |")
    print("|---|---|---|---|---|---|---|")
    for rt in ("rt1", "rt2", "rt3"):
        common = ["train.progress=false", f"train.init={clean}", f"atop.transform={rt}", f"train.epochs={args.epochs}"]
        pre = train(str(RECIPES / "atop_pretrain.toml"), overrides=common, out=work / f"{rt}-pre", **quiet)
        fine = train(str(RECIPES / "atop_finetune.toml"), out=work / f"{rt}-fine", **quiet,
                     overrides=common + [f"atop.purifier_init={pre.run_dir}"])
        seconds = sum(h["epoch_seconds"] for h in fine.history)  # fine-tuning throughput: training loop only
        n_images = len(load_data(DataConfig()).train) * len(fine.history)
        for label, run in (("pre-trained", pre.run_dir), ("AToP fine-tuned", fine.run_dir)):
            started = time.perf_counter()
            report, _ = evaluate(run, suites=["bpda-pgd", "eot-pgd"], n=args.n, progress=False, checks=False)
            took = time.perf_counter() - started
            rows = {r.label: r.robust for r in report.rows}
            fps = f"{n_images / seconds:.0f}" if label != "pre-trained" else "–"
            print(f"| {rt} | {label} | {100 * report.clean:.2f} | {100 * rows['BPDA-PGD-20']:.2f} | "
                  f"{100 * rows['PGD-20 EOT-20']:.2f} | {fps} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
