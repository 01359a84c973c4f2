"""Train every CPU-sized recipe on the embedded digits and measure it: clean, PGD-20, AutoAttack, s/epoch.

    python benchmarks/digits_table.py                           # every recipe in recipes/digits
    python benchmarks/digits_table.py trades pgd_at_awp --seeds 0 1 2
    python benchmarks/digits_table.py --out table.json

Each model is evaluated from its best checkpoint (held-out PGD) on the 360 test digits with the `quick`
suite (FGSM, PGD-20) and the `autoattack` suite (standard, official settings); the last column is the
mean training time per epoch (attack, loss and update only; held-out checks excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "digits"


def measure(recipe: Path, seed: int, workdir: Path, autoattack: bool, overrides: tuple[str, ...] = ()) -> dict:
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    result = train(str(recipe), overrides=[f"train.seed={seed}", "train.progress=false", *overrides],
                   out=workdir / f"{recipe.stem}-{seed}", echo=lambda s: None)
    suites = ["quick", "autoattack"] if autoattack else ["quick"]
    report, _ = evaluate(result.run_dir, suites=suites, seed=seed, progress=False, checks=False)
    rows = {r.label: r.robust for r in report.rows}
    return {"recipe": recipe.stem, "seed": seed, "clean": report.clean, "pgd20": rows["PGD-20"],
            "autoattack": rows.get("AutoAttack (worst case)"),
            "epoch_seconds": statistics.mean(h["epoch_seconds"] for h in result.history),
            "checks_failed": [c["name"] for c in report.checks if c["status"] == "warn"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="recipe names in recipes/digits (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--no-autoattack", action="store_true")
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("-o", "--override", action="append", default=[], help="an override for every recipe")
    args = ap.parse_args()
    names = args.recipes or sorted(p.stem for p in RECIPES.glob("*.toml"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for seed in args.seeds:
                row = measure(RECIPES / f"{name}.toml", seed, Path(tmp), not args.no_autoattack, tuple(args.override))
                rows.append(row)
                aa = "–" if row["autoattack"] is None else f"{100 * row['autoattack']:.2f}"
                print(f"| {name} | {seed} | {100 * row['clean']:.2f} | {100 * row['pgd20']:.2f} | {aa} | "
                      f"{row['epoch_seconds']:.2f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
