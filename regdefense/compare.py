"""Seed × recipe tables from existing run directories: ``regdefense compare RUN...``.

Each run contributes its final table's last-epoch row (clean and PGD accuracy), its latest ``regdefense evaluate``
report when there is one (the AutoAttack worst case when the ``autoattack`` suite ran) and its cost. Runs group by
recipe — the defense stack, dataset and architecture, split further by any other setting that differs between
runs (:func:`split_recipes`) — and each group reports mean ± standard deviation (sample, n−1)
over its seeds. A run that did not finish is shown, with why, and counted as failed — never dropped.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from regdefense.errors import UserError

METRICS = ("clean", "pgd", "autoattack", "wall_seconds", "train_images_per_second")


def read_run(path: str | Path) -> dict[str, Any]:
    """What one run directory says about itself; ``status`` is ``ok`` or why it is not."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is not a run directory (no readable config.json)") from None
    model = (config.get("model") or {}).get("name", "auto")
    row: dict[str, Any] = {
        "run": str(path),
        "seed": (config.get("train") or {}).get("seed"),
        "recipe": f"{'+'.join(config.get('defenses') or []) or 'clean'} | "
        f"{(config.get('data') or {}).get('name', '?')} | {model}",
        "settings": settings(config),
    }
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        error = path / "error.log"
        why = error.read_text().strip().splitlines()[-1][:120] if error.exists() else "did not finish (no summary.json)"
        return row | {"status": why}
    last = summary["table"][0]
    cost = summary.get("cost") or {}
    row |= {
        "status": "ok",
        "clean": last["clean"],
        "pgd": last["robust"],
        "wall_seconds": summary.get("wall_seconds"),
        "train_images_per_second": cost.get("train_images_per_second"),
    }
    try:
        report = json.loads((path / "eval" / "report.json").read_text())
        aa = [r for r in report["rows"] if r["suite"] == "autoattack" and r["kind"] == "group worst case"]
        row["autoattack"] = aa[0]["robust"] if aa else None
    except (OSError, ValueError, KeyError):
        row["autoattack"] = None
    return row


#: config values that differ between the seeds of one recipe without making it another recipe
PER_RUN = {"train.seed", "train.out_dir", "train.device", "train.progress", "train.log", "train.save_every"}


def settings(config: dict[str, Any]) -> dict[str, str]:
    """A run's config as flat ``section.key`` → value text, without what varies from run to run of one recipe."""
    flat: dict[str, str] = {}
    for section, values in config.items():
        if section in ("versions", "resolved"):
            continue
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            if isinstance(value, dict):  # [defense.NAME] tables
                flat |= {f"{key}.{k}": json.dumps(v) for k, v in value.items()}
            else:
                flat[f"{section}.{key}".rstrip(".")] = json.dumps(value)
    return {k: v for k, v in flat.items() if k not in PER_RUN}


def split_recipes(rows: list[dict[str, Any]]) -> None:
    """Runs that share stack | data | model but differ in other settings are different recipes: name each by the
    settings that tell them apart (``pgd_at | digits | auto (pgd_at.steps=7)``)."""
    for label in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == label and r.get("settings") is not None]
        variants = {json.dumps(r["settings"], sort_keys=True) for r in mine}
        if len(variants) < 2:
            continue
        keys = sorted({k for r in mine for k in r["settings"]})
        differ = [k for k in keys if len({r["settings"].get(k) for r in mine}) > 1]
        for r in mine:
            r["recipe"] = f"{label} (" + ", ".join(f"{k}={r['settings'].get(k, '–')}" for k in differ) + ")"


def group(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recipe: runs, failed runs, and mean ± std of each metric over the finished runs that have it."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        done = [r for r in mine if r["status"] == "ok"]
        g: dict[str, Any] = {
            "recipe": recipe,
            "runs": len(mine),
            "failed": len(mine) - len(done),
            "seeds": sorted(r["seed"] for r in done if r["seed"] is not None),
        }
        for m in METRICS:
            values = [r[m] for r in done if r.get(m) is not None]
            g[m] = (
                (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
                if values
                else None
            )
        out.append(g)
    return out


def table(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    def cell(v, pct: bool) -> str:
        if v is None:
            return "–"
        mean, std, _ = v
        return f"{100 * mean:.2f} ± {100 * std:.2f}" if pct else f"{mean:.1f} ± {std:.1f}"

    head = ["recipe", "runs", "failed", "clean %", "PGD %", "AutoAttack %", "wall s", "train img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        lines.append(
            f"| {g['recipe']} | {g['runs']} | {g['failed']} | {cell(g['clean'], True)} | {cell(g['pgd'], True)} "
            f"| {cell(g['autoattack'], True)} | {cell(g['wall_seconds'], False)} "
            f"| {cell(g['train_images_per_second'], False)} |"
        )
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "failed or unfinished runs:"] + [
            f"- {r['run']} (seed {r['seed']}): {r['status']}" for r in failed
        ]
    return "\n".join(lines)


def plot(groups: list[dict[str, Any]], path: Path) -> None:
    """Clean, PGD and AutoAttack accuracy per recipe, mean with the standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(groups)), 3.5))
    width = 0.27
    for k, (m, label) in enumerate((("clean", "clean"), ("pgd", "PGD"), ("autoattack", "AutoAttack"))):
        xs = [i + (k - 1) * width for i, g in enumerate(groups) if g[m]]
        ax.bar(
            xs,
            [100 * g[m][0] for g in groups if g[m]],
            width,
            yerr=[100 * g[m][1] for g in groups if g[m]],
            label=label,
            capsize=3,
        )
    ax.set_xticks(range(len(groups)), [g["recipe"].split(" | ")[0] for g in groups], rotation=20, ha="right")
    ax.set_ylabel("accuracy %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
