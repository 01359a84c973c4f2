"""Randomized smoothing on the embedded digits: gaussian_aug, smoothadv and macer at two noise levels, certified
accuracy at several L2 radii (``regdefense evaluate --certify smoothing``), beside PGD-AT's (uncertified) empirical
L2 accuracy at the same radii (PGD-50 L2, torchattacks), with each training's and certification's wall time.

    python benchmarks/smoothing_table.py                              # the table of issue 37 (CPU: hours)
    python benchmarks/smoothing_table.py --epochs 1 --n 20 --samples 200   # a smoke run (minutes)

Each run uses its recipe (``recipes/digits/{gaussian_aug,smoothadv,macer}.toml``) with ``DEFENSE.sigma`` set, and
is certified with the same σ, n0 = 100, the given n and α = 0.001, on the first ``--n`` test points. The empirical
column is an upper bound on PGD-AT's robust accuracy (an attack), the certified ones lower bounds on the smoothed
classifiers' (a certificate, valid with probability 1 − α per point): the two kinds are not the same measurement.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from regdefense.evaluation.runner import evaluate
from regdefense.evaluation.smoothing import Settings
from regdefense.training.run import train

RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
CHEAP = "torchattacks:FGSM(eps=0.0)"  # the empirical part of a certification run: nothing, quickly


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigmas", default="0.25,0.5")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--n", type=int, default=500, help="test points")
    ap.add_argument("--samples", type=int, default=10_000, help="estimation draws per point (Cohen: 100 000)")
    ap.add_argument("--out", default="runs/smoothing-table")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    quiet = ["train.progress=false", f"train.epochs={args.epochs}", f"train.device={args.device}"]
    rows: list[tuple[str, list[float], str]] = []

    started = time.perf_counter()
    pgd = train(
        "recipes/digits/pgd_at.toml",
        overrides=quiet + ["threat.norm=l2", "threat.eps=0.5", "eval.select=robust"],
        out=out / "pgd_at_l2",
        echo=lambda _m: None,
    ).run_dir
    trained = time.perf_counter() - started
    started = time.perf_counter()
    specs = [f"torchattacks:PGDL2(eps={r},alpha={2.5 * r / 50},steps=50)" for r in RADII if r > 0]
    rep, _ = evaluate(pgd, which="last", suites=specs, n=args.n, checks=False, progress=False, device=args.device)
    by_spec = {row.spec: row.robust for row in rep.rows if row.kind == "attack"}
    empirical = [rep.clean] + [by_spec[s] for s in specs]
    rows.append(
        ("pgd_at (L2 ε 0.5), empirical PGD-50", empirical, f"{trained:.0f} s / {time.perf_counter() - started:.0f} s")
    )

    for sigma in (float(s) for s in args.sigmas.split(",")):
        for name in ("gaussian_aug", "smoothadv", "macer"):
            started = time.perf_counter()
            run = train(
                f"recipes/digits/{name}.toml",
                overrides=quiet + [f"{name}.sigma={sigma}"],
                out=out / f"{name}_s{sigma:g}",
                echo=lambda _m: None,
            ).run_dir
            trained = time.perf_counter() - started
            s = Settings(sigma, n=args.samples, radii=RADII)
            started = time.perf_counter()
            rep, _ = evaluate(
                run,
                which="last",
                suites=[CHEAP],
                n=args.n,
                checks=False,
                progress=False,
                certify="smoothing",
                smoothing=s,
                device=args.device,
            )
            summ = rep.meta["smoothing"]
            took = time.perf_counter() - started
            label = f"{name} σ={sigma:g}, certified (abstain {100 * summ['abstain']:.1f} %, ACR {summ['acr']:.3f})"
            rows.append((label, [r["certified"] for r in summ["table"]], f"{trained:.0f} s / {took:.0f} s"))

    head = " | ".join(f"r = {r:g}" for r in RADII)
    print(f"\n{args.n} digits test points, n0 = 100, n = {args.samples}, α = 0.001, {args.epochs} epochs\n")
    print(f"| model | {head} | train / certify (or attack) |")
    print("|---|" + "---|" * len(RADII) + "---|")
    for label, values, cost in rows:
        print(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | {cost} |")


if __name__ == "__main__":
    main()
