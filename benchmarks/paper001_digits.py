"""Seed 001's flow on the embedded digits: train clean, fine-tune with PGD-AT, ATWR, ATGR and EATR, and evaluate
every model with the `paper-001` suite (FGSM, BIM, PGD-100, C&W at ε = 0.1) and AutoAttack.

    python benchmarks/paper001_digits.py --workdir runs/paper001

Prints, per model: clean accuracy, each attack's accuracy with its Acc-drop and mean PSNR, ATGR's detection
AUROC column for every model, the AutoAttack worst case, and any sanity check that warned (e.g. collapse).
"""

from __future__ import annotations

import argparse
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "digits"
ATTACKS = ("FGSM", "BIM", "PGD-100", "C&W")


def main() -> None:
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/paper001")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    work = Path(args.workdir)
    clean = train(str(RECIPES / "paper001_clean.toml"), overrides=[f"train.seed={args.seed}", "train.progress=false"],
                  out=work / "clean", echo=lambda s: None).run_dir
    runs = {"clean": clean}
    for name in ("pgd_at", "atwr", "atgr", "eatr"):
        runs[name] = train(str(RECIPES / f"paper001_{name}.toml"), out=work / name, echo=lambda s: None,
                           overrides=[f"train.seed={args.seed}", "train.progress=false", f"train.init={clean}"]).run_dir
    head = "| model | clean | " + " | ".join(f"{a} acc / drop / PSNR / AUROC" for a in ATTACKS) + " | AutoAttack | warnings |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, run in runs.items():
        report, files = evaluate(run, suites=["paper-001", "autoattack"], seed=args.seed, progress=False)
        rows = {r.label: r for r in report.rows}
        cells = []
        for a in ATTACKS:
            r = rows[a]
            psnr = "–" if r.psnr_mean is None else f"{r.psnr_mean:.1f}"
            cells.append(f"{100 * r.robust:.2f} / {100 * r.acc_drop:.2f} / {psnr} / {r.auroc:.3f}")
        aa = rows["AutoAttack (worst case)"].robust
        warned = ", ".join(c["name"] for c in report.checks if c["status"] == "warn") or "none"
        print(f"| {name} | {100 * report.clean:.2f} | " + " | ".join(cells) + f" | {100 * aa:.2f} | {warned} |",
              flush=True)


if __name__ == "__main__":
    main()
