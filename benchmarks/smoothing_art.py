"""regdefense's randomized-smoothing CERTIFY against ART's ``PyTorchRandomizedSmoothing.certify`` on the same model,
σ, n0, n and α: both draw their own noise, so they agree in distribution, not point by point. Printed: how often the
two give the same prediction (or both abstain), the certified accuracy of each at several radii, and the mean radius
difference with its standard error over points.

    python benchmarks/smoothing_art.py RUN_OR_MODEL --sigma 0.25 --n 100 --samples 1000

ART's bound calls ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=2α, method="beta")``; when
statsmodels is not installed (it is not a regdefense dependency) a stand-in with that one method — the α-quantile of
Beta(k, n − k + 1), the textbook Clopper-Pearson bound — is put in its place, and the script says so. The rest of
ART's procedure (its sampling, selection, abstention and radius) runs as shipped.
"""

from __future__ import annotations

import argparse
import sys
import time
import types

import numpy as np
from torch import nn


def _statsmodels_stand_in() -> bool:
    try:
        import statsmodels.stats.proportion  # noqa: F401

        return False
    except ImportError:
        from scipy.stats import beta

        def proportion_confint(count, nobs, alpha=0.05, method="beta"):
            assert method == "beta"
            lo = 0.0 if count == 0 else float(beta.ppf(alpha / 2, count, nobs - count + 1))
            hi = 1.0 if count == nobs else float(beta.ppf(1 - alpha / 2, count + 1, nobs - count))
            return lo, hi

        root, stats, prop = (
            types.ModuleType(n) for n in ("statsmodels", "statsmodels.stats", "statsmodels.stats.proportion")
        )
        prop.proportion_confint = proportion_confint  # type: ignore[attr-defined]
        sys.modules.update({"statsmodels": root, "statsmodels.stats": stats, "statsmodels.stats.proportion": prop})
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n", type=int, default=100, help="test points")
    ap.add_argument("--samples", type=int, default=1000, help="estimation draws (n)")
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    args = ap.parse_args()
    stand_in = _statsmodels_stand_in()
    from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing

    from regdefense.evaluation.smoothing import RADII, Settings, certify
    from regdefense.evaluation.targets import load_target

    t = load_target(args.target, which="last", n=args.n, device="cpu")
    model: nn.Module = t.model.eval()
    s = Settings(args.sigma, args.n0, args.samples, args.alpha, batch=1000)
    started = time.perf_counter()
    ours = certify(model, t.x, s, num_classes=t.num_classes)
    ours_s = time.perf_counter() - started
    art = PyTorchRandomizedSmoothing(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(t.x.shape[1:]),
        nb_classes=t.num_classes,
        sample_size=args.n0,
        scale=args.sigma,
        alpha=args.alpha,
        device_type="cpu",
    )
    np.random.seed(0)
    started = time.perf_counter()
    art_pred, art_radius = art.certify(t.x.numpy(), n=args.samples, batch_size=1000)
    art_s = time.perf_counter() - started
    y = t.y.numpy()
    pred, radius = ours.prediction.numpy(), ours.radius.numpy()
    print(f"{args.target}: {len(y)} points, σ = {args.sigma}, n0 = {args.n0}, n = {args.samples}, α = {args.alpha}")
    if stand_in:
        print("statsmodels is not installed: ART's Clopper-Pearson call ran on the stand-in (see the docstring)")
    print(f"same prediction (or both abstain): {np.mean(pred == art_pred) * 100:.1f} %")
    print(f"abstain: ours {np.mean(pred == -1) * 100:.1f} %, ART {np.mean(art_pred == -1) * 100:.1f} %")
    d = radius - art_radius
    print(
        f"radius: ours mean {radius.mean():.4f}, ART mean {art_radius.mean():.4f}, "
        f"mean difference {d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f} (s.e.)"
    )
    for r in RADII["digits" if t.meta.get("dataset") == "digits" else "default"]:
        a = np.mean((pred == y) & (radius >= r)) * 100
        b = np.mean((art_pred == y) & (art_radius >= r)) * 100
        print(f"  certified at r = {r:g}: ours {a:.1f} %, ART {b:.1f} %")
    print(f"time: ours {ours_s:.1f} s, ART {art_s:.1f} s")


if __name__ == "__main__":
    main()
