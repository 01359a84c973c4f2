"""The single-step family side by side with PGD-AT on the embedded digits: robustness, cost, catastrophic overfitting.

    python benchmarks/fast_at_table.py                       # 3 seeds, eps 0.2 and 0.3, AutoAttack on 50 points
    python benchmarks/fast_at_table.py --seeds 0 --eps 0.2 --n 50 --methods fast_at n_fgsm pgd_at
    python benchmarks/fast_at_table.py --out fast_at.json

Every method trains its digits recipe (`recipes/digits/<method>.toml`, 30 epochs; Free-AT 8 epochs × 4 replays) at
each ε with each seed, the catastrophic-overfitting guard on for all (`eval.co_guard=on`: held-out FGSM against PGD
every epoch). The **last** epoch is evaluated — catastrophic overfitting is exactly what a best-epoch checkpoint
hides — on the 360 test digits for clean and PGD-20 and on the first `--n` with the official AutoAttack (standard).
Per method: mean ± std over the seeds; training seconds (the epochs' own time: attack, loss and update) and training
images/s; the cost relative to PGD-10 AT (training seconds over PGD-AT's at the same ε); and `CO k/n`: the seeds on
which the guard flagged catastrophic overfitting at some epoch (FGSM beating PGD by more than 20 points).
At ε = 0.3 FGSM-RS (fast_at) overfits catastrophically on the digits; that is the larger ε.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "digits"
METHODS = ("fast_at", "fgsm_pgk", "n_fgsm", "gradalign", "zerograd", "multigrad", "atas", "free_at", "pgd_at")


def measure(method: str, eps: float, seed: int, n: int, workdir: Path) -> dict:
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    overrides = [f"threat.eps={eps}", f"train.seed={seed}", "train.progress=false", "eval.co_guard=on"]
    if method == "gradalign":
        overrides.append(f"fast_at.alpha={eps}")  # the paper's FGSM step: alpha = eps
    res = train(str(RECIPES / f"{method}.toml"), overrides=overrides, out=workdir / f"{method}-{eps}-{seed}",
                echo=lambda s: None)
    started = time.perf_counter()
    quick, _ = evaluate(res.run_dir, suites=["quick"], which="last", seed=seed, progress=False, checks=False)
    aa = None
    if n:
        aa, _ = evaluate(res.run_dir, suites=["autoattack"], which="last", n=n, seed=seed, progress=False, checks=False)
    seconds = sum(h["epoch_seconds"] for h in res.history)
    return {
        "method": method,
        "eps": eps,
        "seed": seed,
        "clean": quick.clean,
        "pgd20": next(r.robust for r in quick.rows if r.label == "PGD-20"),
        "autoattack": next(r.robust for r in aa.rows if r.label == "AutoAttack (worst case)") if aa else None,
        "train_seconds": seconds,
        "images_per_second": res.cost.get("train_images_per_second"),
        "co": any(h.get("catastrophic_overfitting") for h in res.history),
        "co_epochs": [h["epoch"] for h in res.history if h.get("catastrophic_overfitting")],
        "eval_seconds": time.perf_counter() - started,
    }


def _ms(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    if len(values) < 2:
        return f"{scale * values[0]:.1f} (n=1)" if values else "–"
    return f"{scale * statistics.fmean(values):.1f} ± {scale * statistics.stdev(values):.1f}"


def table(rows: list[dict]) -> str:
    lines = []
    for eps in dict.fromkeys(r["eps"] for r in rows):
        mine = [r for r in rows if r["eps"] == eps]
        pgd = [r["train_seconds"] for r in mine if r["method"] == "pgd_at"]
        base = statistics.fmean(pgd) if pgd else None
        lines += [
            f"\nε = {eps} (digits, last epoch; AutoAttack on the first {mine[0].get('n', '?')} test points)\n",
            "| method | clean % | PGD-20 % | AutoAttack % | train s | images/s | cost vs PGD-10 AT | CO |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method in dict.fromkeys(r["method"] for r in mine):
            rs = [r for r in mine if r["method"] == method]
            secs = [r["train_seconds"] for r in rs]
            rel = f"{statistics.fmean(secs) / base:.2f}×" if base else "–"
            co = sum(r["co"] for r in rs)
            lines.append(
                f"| {method} | {_ms([r['clean'] for r in rs])} | {_ms([r['pgd20'] for r in rs])} | "
                f"{_ms([r['autoattack'] for r in rs if r['autoattack'] is not None])} | {_ms(secs, False)} | "
                f"{statistics.fmean(r['images_per_second'] or 0 for r in rs):.0f} | {rel} | "
                f"{'**' if co else ''}{co}/{len(rs)}{'**' if co else ''} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--n", type=int, default=50, help="points for AutoAttack (default 50; 0: no AutoAttack)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in args.eps:
            for method in args.methods:
                for seed in args.seeds:
                    row = measure(method, eps, seed, args.n, Path(tmp)) | {"n": args.n}
                    rows.append(row)
                    aa = "–" if row["autoattack"] is None else f"{100 * row['autoattack']:.1f}"
                    co = f" CO at epochs {row['co_epochs']}" if row["co"] else ""
                    print(f"eps {eps} {method} seed {seed}: clean {100 * row['clean']:.1f} PGD-20 "
                          f"{100 * row['pgd20']:.1f} AA {aa} train {row['train_seconds']:.1f} s{co}", flush=True)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
