"""Randomized smoothing: Cohen, Rosenfeld & Kolter's (ICML 2019) PREDICT and CERTIFY for an L2 certificate.

The smoothed classifier is g(x) = argmax_c P(f(x + N(0, σ²I)) = c). CERTIFY draws ``n0`` noisy copies of x to select
the top class ĉ, then ``n`` fresh copies to count how often f returns ĉ (n_A); p_A's one-sided Clopper-Pearson lower
bound at level α is p̲ = Beta⁻¹(α; n_A, n − n_A + 1); if p̲ < ½ it abstains, else g is certified to return ĉ on the
whole L2 ball of radius R = σ·Φ⁻¹(p̲) around x — with probability at least 1 − α over the draws, per point (not for all
points at once: over m points about α·m certificates may be wrong). PREDICT draws ``n`` copies and answers the top
class only when a two-sided binomial test of its count against the runner-up's rejects equality at level α.

Noise for point i is drawn from a generator seeded by (seed, i), i the point's index in the whole evaluation, so a
point gets the same draws in a chunked, sharded or resumed evaluation as in one pass (on the same device and with
the same ``batch``: the draws are made ``batch`` at a time, and CPU and CUDA generators differ).

**What the certificate does and does not guarantee in floating point** (Voráček & Hein, "Sound randomized smoothing
in floating-point arithmetics", 2022): Cohen's theorem is about the real-valued Gaussian. Here the noise is the
float32 output of torch's generator (a finite set of values, not N(0, σ²)), x + noise is rounded to float32, and f
runs in floating point. The theorem does hold for the classifier h(u) = f(fl(u)) smoothed with a *real* Gaussian,
but our samples of fl(x + fl(σz)) do not have exactly the law of fl(x + σZ): the two differ in their low-order bits,
and the gap depends on x. Voráček & Hein build base classifiers that read those bits and obtain certificates that
are false; their sound sampler (a discrete Gaussian on the 1/255 lattice from 60-bit integers, certifying
perturbations on that lattice) is NOT implemented here. So: the radius is a statement about the idealised smoothed
classifier, valid with probability ≥ 1 − α per point provided the base classifier's decision does not depend on the
rounding pattern of its input (true of ordinary networks in the authors' experiments, where the sound and the
standard sampler certify nearly the same radii; not something this code checks), for real-valued perturbations of
any kind (the [0, 1] box and 8-bit quantisation are not used, which only makes the ball larger than needed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from regdefense.attacks.adapter import model_mode
from regdefense.base.errors import UserError
from regdefense.base.files import WriteError, save_png, write_atomic
from regdefense.evaluation.metrics import wilson_interval

#: what a point's prediction is when the smoothed classifier abstains
ABSTAIN = -1

#: Cohen et al.'s settings (``certify.py``: N0 = 100, N = 100 000, α = 0.001)
N0, N, ALPHA = 100, 100_000, 0.001

#: L2 radii of the certified table: Cohen et al.'s CIFAR-10 columns; the digits get a finer start. The digits' pixels
#: are large (8×8, an L∞ budget of 0.2 is an L2 distance of 1.6 at a corner of the cube, CIFAR-10's 8/255 is 1.74), so
#: the same L2 radii mean about as much there as on CIFAR-10, whose usual L2 budget is 0.5
RADII = {"default": (0.0, 0.25, 0.5, 0.75, 1.0), "digits": (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)}

FLOAT_NOTE = (
    "the certificate is Cohen et al.'s for real-valued Gaussian noise, valid with probability ≥ 1 − α per point; the "
    "noise is sampled in float32 (Voráček & Hein 2022): not sound against a base classifier that reads the rounding "
    "of its input (see regdefense.evaluation.smoothing)"
)


def lower_confidence_bound(count: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper-Pearson lower bound on a binomial proportion after ``count`` successes in ``n``:
    the α-quantile of Beta(count, n − count + 1), 0 when ``count`` is 0 (the reference's
    ``proportion_confint(count, n, alpha=2α, method="beta")[0]``)."""
    from scipy.stats import beta

    if count <= 0:
        return 0.0
    return float(beta.ppf(alpha, count, n - count + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """σ·Φ⁻¹(p̲), the radius for a lower bound ``p_lower`` ≥ ½ on the top class's probability (0 below ½: abstain)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(p_lower)) if p_lower >= 0.5 else 0.0


def point_seed(seed: int, index: int) -> int:
    """The seed of point ``index``'s noise in an evaluation seeded ``seed`` (distinct from the attacks' batch seeds)."""
    return (seed * 1_000_003 + index) * 2 + 1


@dataclass
class Settings:
    """One certification's settings (Cohen et al.'s defaults)."""

    sigma: float
    n0: int = N0
    n: int = N
    alpha: float = ALPHA
    batch: int = 1000  #: noisy copies per forward pass
    seed: int = 0
    radii: tuple[float, ...] | None = None  #: the table's columns (None: :data:`RADII` for the dataset)

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise UserError(f"--sigma must be > 0 for --certify smoothing, got {self.sigma}")
        if self.n0 < 1 or self.n < 1 or self.batch < 1:
            raise UserError(f"--n0, --n-samples and --mc-batch must be >= 1 (got {self.n0}, {self.n}, {self.batch})")
        if not 0 < self.alpha < 0.5:
            raise UserError(f"--alpha must lie in (0, 0.5), got {self.alpha}")
        if self.radii is not None and any(r < 0 for r in self.radii):
            raise UserError(f"--radii must be >= 0, got {list(self.radii)}")

    def key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("sigma", "n0", "n", "alpha", "batch", "seed")}

    def label(self) -> str:
        return f"smoothing σ={self.sigma:g} n0={self.n0} n={self.n} α={self.alpha:g}"


@dataclass
class Certified:
    """Per point: the smoothed prediction (:data:`ABSTAIN` when it abstains), the certified L2 radius (0 when it
    abstains), the count n_A of the selected class among the ``n`` estimation draws, and p_A's lower bound."""

    prediction: Tensor
    radius: Tensor
    count: Tensor
    p_lower: Tensor
    seconds: float = 0.0

    @staticmethod
    def empty() -> Certified:
        return Certified(
            torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
        )

    @staticmethod
    def cat(parts: list[Certified]) -> Certified:
        return Certified(
            prediction=torch.cat([p.prediction for p in parts]),
            radius=torch.cat([p.radius for p in parts]),
            count=torch.cat([p.count for p in parts]),
            p_lower=torch.cat([p.p_lower for p in parts]),
            seconds=sum(p.seconds for p in parts),
        )

    def __len__(self) -> int:
        return len(self.prediction)


def sample_counts(
    model: nn.Module, x: Tensor, num: int, sigma: float, num_classes: int, batch: int, generator: torch.Generator
) -> Tensor:
    """Class counts of f(x + N(0, σ²I)) over ``num`` draws, ``batch`` at a time (x: one input, C×H×W)."""
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)  # summed on the device: one copy per point
    left = num
    with torch.no_grad():
        while left > 0:
            b = min(batch, left)
            left -= b
            noise = torch.randn((b, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
            pred = model(x.unsqueeze(0) + sigma * noise).argmax(1)
            counts += torch.bincount(pred, minlength=num_classes)[:num_classes]
    return counts.cpu()


def predict(
    model: nn.Module,
    x: Tensor,
    s: Settings,
    *,
    num_classes: int,
    first_index: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Cohen et al.'s PREDICT for each point of ``x``: the top class of ``s.n`` noisy draws, or :data:`ABSTAIN` when a
    two-sided binomial test of its count against the runner-up's (p = ½) does not reject at level ``s.alpha``."""
    from scipy.stats import binomtest

    out = torch.full((len(x),), ABSTAIN, dtype=torch.long)
    with model_mode(model, False):  # Cohen et al.: base_classifier.eval(); every mode restored after
        for i in range(len(x)):
            gen = torch.Generator(device=device).manual_seed(point_seed(s.seed, first_index + i))
            counts = sample_counts(model, x[i].to(device), s.n, s.sigma, num_classes, s.batch, gen)
            top2 = counts.topk(2)
            c1, c2 = int(top2.values[0]), int(top2.values[1])
            if binomtest(c1, c1 + c2, 0.5).pvalue <= s.alpha:
                out[i] = int(top2.indices[0])
    return out


class Progress:
    """The finished prefix of one certification, saved (atomically) to ``path`` at least every ``every`` seconds and
    when it stops, and taken up again when the same key (points, weights, settings) comes back."""

    def __init__(self, path: str | Path, key: dict[str, Any], every: float = 30.0) -> None:
        self.path, self.key, self.every = Path(path), key, every
        self.done = Certified.empty()
        self.note = ""
        self._last = time.monotonic()
        if not self.path.is_file():
            return
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # cut off mid-write by a crash: start over rather than fail
            self.note = f"could not read {self.path} ({type(exc).__name__}); certifying from the start"
            return
        if isinstance(data, dict) and data.get("key") == key:
            self.done = Certified(**data["done"])
            self.note = f"resuming the certification from {self.path}: {len(self.done)} points done"
        else:
            self.note = f"{self.path} holds another certification's progress; certifying from the start"

    def add(self, part: Certified) -> None:
        self.done = Certified.cat([self.done, part])
        if time.monotonic() - self._last >= self.every:
            self.save()

    def save(self) -> None:
        d = self.done
        done = {"prediction": d.prediction, "radius": d.radius, "count": d.count, "p_lower": d.p_lower}
        payload = {"key": self.key, "done": done | {"seconds": d.seconds}}
        write_atomic(self.path, lambda fh: torch.save(payload, fh), "the certification's progress")
        self._last = time.monotonic()


def certify(
    model: nn.Module,
    x: Tensor,
    s: Settings,
    *,
    num_classes: int,
    first_index: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    state: Progress | None = None,
) -> Certified:
    """Cohen et al.'s CERTIFY for each point of ``x`` (see the module): selection with ``s.n0`` draws, estimation with
    ``s.n`` fresh ones from the same per-point generator, abstention when p̲ < ½.

    :param first_index: the position of ``x[0]`` in the whole evaluation (seeds each point's noise).
    :param state: where the finished points are kept; the points it holds are not certified again.
    """
    done = state.done if state is not None else Certified.empty()
    if len(done) > len(x):
        done = Certified.empty()
    start = len(done)
    bar = tqdm(
        total=len(x) * (s.n0 + s.n),
        initial=start * (s.n0 + s.n),
        desc=f"certify (smoothing σ={s.sigma:g})",
        unit="draw",
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
        disable=not progress,
    )
    parts = [done]
    try:
        with model_mode(model, False):  # Cohen et al.: base_classifier.eval(); every mode restored after
            for i in range(start, len(x)):
                t0 = time.perf_counter()
                xi = x[i].to(device)
                gen = torch.Generator(device=device).manual_seed(point_seed(s.seed, first_index + i))
                c_hat = int(sample_counts(model, xi, s.n0, s.sigma, num_classes, s.batch, gen).argmax())
                bar.update(s.n0)
                n_a = int(sample_counts(model, xi, s.n, s.sigma, num_classes, s.batch, gen)[c_hat])
                bar.update(s.n)
                p = lower_confidence_bound(n_a, s.n, s.alpha)
                one = Certified(
                    torch.tensor([c_hat if p >= 0.5 else ABSTAIN]),
                    torch.tensor([certified_radius(p, s.sigma)]),
                    torch.tensor([n_a]),
                    torch.tensor([p]),
                    seconds=time.perf_counter() - t0,
                )
                parts.append(one)
                if state is not None:
                    state.add(one)
    except BaseException:  # an interruption: keep every finished point for the next run
        if state is not None:
            try:
                state.save()
            except WriteError:
                pass  # the error on its way out says what went wrong
        raise
    finally:
        bar.close()
    return Certified.cat(parts)


def default_radii(dataset: str) -> tuple[float, ...]:
    return RADII["digits"] if dataset == "digits" else RADII["default"]


def summary(result: Certified, y: Tensor, s: Settings, dataset: str = "") -> dict[str, Any]:
    """The certified table: for each radius r, the fraction of points whose smoothed prediction is the true label and
    certified at radius ≥ r (with its Wilson interval), the abstain rate and the average certified radius (MACER's
    ACR: the radius of correct points, 0 for the others)."""
    ok = result.prediction == y.cpu()
    n = len(ok)
    radii = s.radii if s.radii is not None else default_radii(dataset)
    rows = []
    for r in radii:
        hit = ok & (result.radius >= r)
        rows.append({"radius": r, "certified": float(hit.float().mean()), "ci": wilson_interval(int(hit.sum()), n)})
    return {
        "method": "randomized smoothing (Cohen et al. 2019)",
        **s.key(),
        "points": n,
        "table": rows,
        "abstain": float((result.prediction == ABSTAIN).float().mean()),
        "smoothed_accuracy": float(ok.float().mean()),
        "acr": float(torch.where(ok, result.radius, torch.zeros_like(result.radius)).mean()),
        "seconds": result.seconds,
        "seconds_per_point": result.seconds / max(1, n),
        "curve": curve(result, y),
        "soundness": FLOAT_NOTE,
    }


def curve(result: Certified, y: Tensor, steps: int = 60) -> list[tuple[float, float]]:
    """Certified accuracy on a grid of radii from 0 past the largest certified one (for the plot)."""
    ok = result.prediction == y.cpu()
    top = float(result.radius.max()) if len(result) else 0.0
    top = top * 1.05 if top > 0 else 1.0
    return [
        (r, float((ok & (result.radius >= r)).float().mean())) for r in (top * k / (steps - 1) for k in range(steps))
    ]


def markdown(summ: dict[str, Any]) -> list[str]:
    """The certified table of a report, apart from the empirical rows."""
    lines = [
        f"## Certified accuracy: randomized smoothing (σ = {summ['sigma']:g})",
        "",
        f"Smoothed classifier g(x) = argmax P(f(x + N(0, σ²I)) = c), certified by Cohen et al.'s CERTIFY with "
        f"n0 = {summ['n0']}, n = {summ['n']}, α = {summ['alpha']:g} on {summ['points']} points "
        f"({summ['seconds_per_point']:.2f} s per point, {summ['seconds']:.0f} s in all). A point counts at radius r "
        f"when g's prediction is its label and its certified L2 radius is ≥ r. These are certificates of g, not "
        f"empirical accuracies of f: never compare them row by row with the attacks above.",
        "",
        "| L2 radius | certified acc % | 95 % CI |",
        "|---|---|---|",
    ]
    for row in summ["table"]:
        lo, hi = row["ci"]
        lines.append(f"| {row['radius']:g} | {100 * row['certified']:.2f} | {100 * lo:.2f}–{100 * hi:.2f} |")
    lines += [
        "",
        f"Abstained: {100 * summ['abstain']:.2f} %; smoothed (non-abstaining, correct) accuracy "
        f"{100 * summ['smoothed_accuracy']:.2f} %; average certified radius (ACR) {summ['acr']:.3f}.",
        f"Soundness: {summ['soundness']}.",
        "",
    ]
    return lines


def plot(summ: dict[str, Any], path: Path) -> None:
    """Certified accuracy against the L2 radius (a step curve), with the table's radii marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs, ys = zip(*summ["curve"]) if summ["curve"] else ((), ())
    ax.step(xs, [100 * v for v in ys], where="post", label=f"σ = {summ['sigma']:g}")
    ax.plot([r["radius"] for r in summ["table"]], [100 * r["certified"] for r in summ["table"]], "o")
    ax.set(
        title=f"Certified accuracy (randomized smoothing, n = {summ['n']}, α = {summ['alpha']:g})",
        xlabel="L2 radius",
        ylabel="certified accuracy (%)",
        ylim=(0, 100),
    )
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
