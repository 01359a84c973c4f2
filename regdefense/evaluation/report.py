"""Evaluation reports: report.json, report.md and the PNG plots."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from regdefense.base.files import WriteError, save_png, why, write_atomic
from regdefense.evaluation.metrics import psnr
from regdefense.evaluation.results import Report
from regdefense.evaluation.smoothing import markdown as smoothing_table
from regdefense.evaluation.smoothing import plot as plot_certified


def _pct(v) -> str:
    return "–" if v is None or v != v else f"{100 * v:.2f}"


def markdown(report: Report) -> str:
    m = report.meta
    lines = [f"# Robustness report: {m.get('target', 'model')}", ""]
    lines.append(
        f"- dataset: {m.get('dataset', '?')}, {m['n']} test points; threat model {m['norm']}, "
        f"ε = {m['eps']:.4g}; seed {m['seed']}"
    )
    for name, proto in report.protocols.items():
        lines.append(f"- `{name}`: {proto}")
    lines += _headline_lines(report)
    lo, hi = report.clean_ci
    lines += [
        "",
        f"Clean accuracy: **{_pct(report.clean)} %** (95 % CI {_pct(lo)}–{_pct(hi)})",
        "",
        "| attack | suite | robust acc % | 95 % CI | Acc-drop (pt) | mean PSNR (dB) | L∞ max | L2 mean "
        "| detection AUROC | EOT | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        label = f"**{r.label}**" if r.kind in ("worst case", "group worst case", "best known") else r.label
        label += " (black-box)" if r.black_box else ""
        label += f" ({r.outside} outside ε, see warnings)" if r.outside else ""
        psnr = "–" if r.psnr_mean is None else f"{r.psnr_mean:.1f}"
        auroc = "–" if r.auroc is None or r.auroc != r.auroc else f"{r.auroc:.3f}"
        linf = f"{r.norms['linf_max']:.4g}" if r.norms else "–"
        l2 = f"{r.norms['l2_mean']:.4g}" if r.norms else "–"
        lines.append(
            f"| {label} | {r.suite} | {_pct(r.robust)} | {_pct(r.ci[0])}–{_pct(r.ci[1])} | "
            f"{100 * r.acc_drop:.2f} | {psnr} | {linf} | {l2} | {auroc} | {'yes' if r.eot else 'no'} | "
            f"{r.seconds:.1f} |"
        )
    lines += [
        "",
        "Robust accuracy is per point against the true labels; a worst case is the fraction of points "
        "that survive every attack. Acc-drop = clean − robust (seed 001, Eq. 21). AUROC separates clean from "
        "adversarial inputs by 1 − max softmax probability. Cascade steps (`group: after X`) are "
        "cumulative. The best-known row is the per-point worst case over every attack ever run on these "
        "weights at this ε, wherever its report was written (the weights' ledger in the cache; a copy in "
        "`ledger.json`); `report.json` names the attack that broke each point.",
        "",
    ]
    if "smoothing" in m:  # certificates of the smoothed classifier: a table of their own, never a row above
        lines += smoothing_table(m["smoothing"])
    if report.checks:
        lines += [
            f"## Sanity checks (on {m.get('checks_on', '?')} points)",
            "",
            "| check | status | finding |",
            "|---|---|---|",
        ]
        for c in report.checks:
            status = "PASS" if c["status"] == "pass" else ("**WARN**" if c["status"] == "warn" else "skip")
            lines.append(f"| {c['name']} | {status} | {c['message']} |")
        lines.append("")
    lines += _escalation_lines(report)
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    lines += [
        "![robust accuracy against eps](robust_vs_eps.png)",
        "",
        "![clean and adversarial examples](examples.png)",
        "",
    ]
    if "smoothing" in m:
        lines += ["![certified accuracy against L2 radius](certified_vs_radius.png)", ""]
    return "\n".join(lines)


def _headline_lines(report: Report) -> list[str]:
    """The top line of an evaluation with ``--adaptive auto``: the best-known number (the ledger's when there is one,
    else this evaluation's suites + checks + escalations), with the suites alone and the official AutoAttack beside."""
    h = report.meta.get("headline")
    if not h:
        return []
    best = report.meta.get("best_known", {}).get("robust", h["best_known"])
    where = "ledger: every attack on these weights" if "best_known" in report.meta else "suites + checks + escalations"
    aa = "not run" if h.get("autoattack") is None else f"{_pct(h['autoattack'])} %"
    r = h.get("randomized")
    if r:  # a randomized model: one pass is a draw; the majority vote of several is the number
        return [
            "",
            f"**Randomized model: {_pct(r['majority'])} % by majority vote of {r['passes']} passes** under "
            f"EOT-PGD-20 (EOT-{r['eot']}, {r['n']} points; the headline) — expected per-pass accuracy "
            f"{_pct(r['per_pass'])} %; the union of single-pass failures over every attack, {_pct(best)} % ({where}), "
            f"counts lucky draws; suites only {_pct(h['suites'])} %, official AutoAttack {aa}",
        ]
    return [
        "",
        f"**Best known robust accuracy: {_pct(best)} %** ({where}) — suites only {_pct(h['suites'])} %, "
        f"official AutoAttack {aa}",
    ]


def _escalation_lines(report: Report) -> list[str]:
    """What each escalation ran, why, what it found and how long it took."""
    if not report.escalations:
        return []
    lines = [
        f"## Escalations (on {report.meta.get('checks_on', '?')} points)",
        "",
        "| escalation | answers | attacks | broke | best known before → after % | s | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in report.escalations:
        notes = [e.get("note", "")]
        if "budget" in e:
            notes.append(f"final budget {e['budget']}")
        if "eot" in e:
            notes.append(
                f"EOT-{e['eot']}: expected per-pass accuracy {_pct(e['per_pass'])} %, majority vote of "
                f"{e['passes']} passes {_pct(e['majority'])} % (the headline: majority vote)"
            )
        lines.append(
            f"| {e['name']} | {'; '.join(e['answers'])} | {', '.join(e['attacks']) or '–'} | {e['broke']} | "
            f"{_pct(e['before'])} → {_pct(e['after'])} | {e['seconds']:.1f} | {'; '.join(n for n in notes if n)} |"
        )
    return lines + [""]


def eps_floor(report: Report) -> dict[str, float] | None:
    """The largest-ε point of the sweep when accuracy there stays above max(10 %, 1/K) — the "very large ε" check's
    threshold: a sweep that fails to reach zero is the classic sign of gradient masking. None when it does reach it."""
    if not report.eps_curve:
        return None
    last = max(report.eps_curve, key=lambda p: p["eps"])
    limit = max(0.10, 1.0 / max(1, int(report.meta.get("num_classes") or 10)))
    return last if last["acc"] > limit else None


def plot_eps_curve(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report.eps_curve
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([p["eps"] for p in pts], [100 * p["acc"] for p in pts], marker="o")
    ax.axvline(report.meta["eps"], color="grey", ls="--", lw=1, label=f"evaluated ε = {report.meta['eps']:.3g}")
    floor = eps_floor(report)
    if floor is not None:  # accuracy that no ε brings to zero: the attack, not the model, stops there
        ax.axhline(
            100 * floor["acc"],
            color="red",
            ls=":",
            lw=1.2,
            label=f"does not reach 0: {100 * floor['acc']:.1f} % at ε = {floor['eps']:.3g} (masking?)",
        )
        ax.plot([floor["eps"]], [100 * floor["acc"]], marker="X", color="red", ms=10)
    ax.set(
        title=f"Robust accuracy against ε (PGD-20, {report.meta.get('checks_on', '?')} points)",
        xlabel=f"ε ({report.meta['norm']})",
        ylabel="accuracy (%)",
        ylim=(0, 100),
    )
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def plot_examples(report: Report, path: Path) -> None:
    """A grid: clean images on top, one row per attack below, each adversarial image with its PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = dict(report.examples)
    clean, labels = ex.pop("clean"), ex.pop("labels")
    rows = [("clean", clean)] + list(ex.items())
    k = len(clean)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.3 * k, 1.45 * len(rows)), squeeze=False)
    for i, (name, imgs) in enumerate(rows):
        values = psnr(clean, imgs) if i else torch.zeros(k)
        for j in range(k):
            ax = axes[i][j]
            img = imgs[j].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(
                img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None, vmin=0, vmax=1
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i:
                v = float(values[j])
                ax.set_xlabel("unchanged" if v == float("inf") else f"{v:.1f} dB", fontsize=7)
            else:
                ax.set_xlabel(f"label {int(labels[j])}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle("Clean images (top) and adversarial versions with their PSNR", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def record(report: Report, out: Path) -> dict[str, Path]:
    """Write an evaluation so that none before it is lost: its own folder ``out/evaluations/NNN-SUITES/`` (report.json,
    report.md, plots), the latest evaluation's files at ``out/`` itself (where scripts look), and the summary across
    every evaluation kept there (``evaluations.md``, ``evaluations.json``), grouped by the weights evaluated."""
    report.meta.setdefault("evaluated_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    history = out / "evaluations"
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "-", "+".join(map(str, report.meta.get("suites") or ["eval"])))[:48].strip("-")
    try:
        history.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name.split("-")[0]) for p in history.iterdir() if p.name.split("-")[0].isdigit()]
        own = history / f"{max(taken, default=0) + 1:03d}-{slug or 'eval'}"
        own.mkdir()
    except OSError as exc:
        raise WriteError(f"could not write the report into {history}: {why(exc)}") from None
    write(report, own)
    files = write(report, out, plots=own)
    files["evaluation"] = own
    files.update(summarize(out))
    return files


def rewrite(report: Report, files: dict[str, Path]) -> None:
    """Write an evaluation :func:`record` wrote again, in place (its best-known row added after the ledger)."""
    write(report, files["evaluation"], plots=False)
    write(report, files["json"].parent, plots=False)
    summarize(files["json"].parent)


def summary_row(rep: dict[str, Any], folder: str) -> dict[str, Any]:
    """One evaluation in the summary: what was evaluated, with what, and the numbers."""
    m = rep.get("meta", {})
    best = next((r["robust"] for r in rep.get("rows", []) if r.get("kind") == "best known"), None)
    return {
        "evaluation": folder,
        "at": m.get("evaluated_at", ""),
        "target": str(m.get("target", "")),
        "epoch": m.get("epoch"),
        "weights_sha256": m.get("weights_sha256", ""),
        "suites": list(m.get("suites") or []),
        "eps": m.get("eps"),
        "norm": m.get("norm"),
        "n": m.get("n"),
        "clean": rep.get("clean"),
        "worst_case": rep.get("worst_case"),
        "best_known": best,
        "warned_checks": [c["name"] for c in rep.get("checks", []) if c.get("status") == "warn"],
    }


def summarize(out: Path) -> dict[str, Path]:
    """``evaluations.json`` and ``evaluations.md``: every evaluation kept in ``out/evaluations``, oldest first,
    grouped by the weights evaluated (a run's best.pt and last.pt are separate groups)."""
    rows = []
    for folder in sorted((out / "evaluations").glob("*/report.json")):
        try:
            rows.append(summary_row(json.loads(folder.read_text()), folder.parent.name))
        except (OSError, ValueError):
            continue  # a folder being written, or damaged: the summary lists what it can read
    files = {"evaluations_json": out / "evaluations.json", "evaluations_md": out / "evaluations.md"}
    write_atomic(files["evaluations_json"], json.dumps(rows, indent=2, default=str))
    lines = ["# Evaluations", ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["weights_sha256"] or r["target"], []).append(r)
    for key, members in groups.items():
        first = members[0]
        epoch = f", epoch {first['epoch']}" if first["epoch"] is not None else ""
        lines += [
            f"## {first['target'] or 'model'}{epoch}" + (f" (weights {key[:12]})" if first["weights_sha256"] else ""),
            "",
            "| evaluation | when (UTC) | attacks | ε | points | clean % | worst case % | best known % "
            "| checks warned |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in members:
            eps = "–" if r["eps"] is None else f"{r['eps']:.4g} ({r['norm']})"
            warned = ", ".join(r["warned_checks"]) or "none"
            lines.append(
                f"| [{r['evaluation']}](evaluations/{r['evaluation']}/report.md) | {r['at']} | "
                f"{', '.join(r['suites'])} | {eps} | {r['n']} | {_pct(r['clean'])} | {_pct(r['worst_case'])} | "
                f"{_pct(r['best_known'])} | {warned} |"
            )
        lines.append("")
    write_atomic(files["evaluations_md"], "\n".join(lines))
    return files


def write(report: Report, out: Path, plots: Path | bool = True) -> dict[str, Path]:
    """Write report.json, report.md, robust_vs_eps.png and examples.png into ``out``. ``plots``: True draws the
    figures, a folder copies the ones already drawn there (drawing is most of a small evaluation's writing time), False
    leaves them as they are (a rewrite: no figure depends on the best-known row)."""
    files = {"json": out / "report.json", "md": out / "report.md"}
    write_atomic(files["json"], json.dumps(report.to_dict(), indent=2, default=str), "the report")
    write_atomic(files["md"], markdown(report), "the report")
    figures = [
        ("eps_plot", "robust_vs_eps.png", bool(report.eps_curve), lambda f: plot_eps_curve(report, f)),
        ("examples", "examples.png", bool(report.examples), lambda f: plot_examples(report, f)),
        (
            "certified_plot",
            "certified_vs_radius.png",
            "smoothing" in report.meta,
            lambda f: plot_certified(report.meta["smoothing"], f),
        ),
    ]
    for key, name, present, draw in figures:
        if not present:
            continue
        files[key] = out / name
        if isinstance(plots, Path):
            write_atomic(files[key], (plots / name).read_bytes(), "the plot")
        elif plots:
            draw(files[key])
    return files
