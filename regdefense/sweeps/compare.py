"""Seed × recipe tables from existing run directories: ``regdefense compare RUN...``.

Each run contributes its final table's last-epoch row (clean and PGD accuracy), its latest ``regdefense evaluate``
with the ``autoattack`` suite when there is one (its worst case) and its cost; the table says which checkpoint and
how many points each column was measured on. Runs group by recipe — the defense stack, dataset and architecture (as
resolved: ``auto`` and the architecture it picked are one), split further by any other setting that differs between
runs (:func:`split_recipes`) — and each group reports mean ± standard deviation (sample, n−1)
over its seeds ("n=1" where there is no spread). A run that did not finish is shown, with why, and counted as failed
— never dropped; a folder that is no usable run is listed with why, and the others are still compared. A folder that
is no run (a sweep's output) is searched for runs.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path
from typing import Any

from regdefense.models.weights import architecture

METRICS = ("clean", "pgd", "autoattack", "wall_seconds", "train_images_per_second")
#: where each accuracy column comes from, per run (``"last epoch, 360 points"``)
SOURCES = {"clean": "clean_from", "pgd": "pgd_from", "autoattack": "autoattack_from"}


def find_runs(paths: list[str | Path], depth: int = 3) -> list[Path]:
    """The run folders under ``paths``: a folder with a ``config.json`` or an ``error.log`` is a run; any other folder
    is searched (a sweep's ``OUT/<recipe>/seed<k>``) up to ``depth`` levels down, and kept as it is when nothing is
    found there (it is then listed as unusable, with why)."""
    out: list[Path] = []
    for p in map(Path, paths):
        found = _runs_below(p, depth) if p.is_dir() and not _is_run(p) else []
        out += found or [p]
    return list(dict.fromkeys(out))


def _is_run(p: Path) -> bool:
    return (p / "config.json").exists() or (p / "error.log").exists()


def _runs_below(p: Path, depth: int) -> list[Path]:
    if depth == 0:
        return []
    runs = []
    for child in sorted(c for c in p.iterdir() if c.is_dir()):
        runs += [child] if _is_run(child) else _runs_below(child, depth - 1)
    return runs


def _error_line(path: Path) -> str | None:
    error = path / "error.log"
    if not error.exists():
        return None
    lines = [line for line in error.read_text(errors="replace").strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "failed (empty error.log)"


def read_run(path: str | Path) -> dict[str, Any]:
    """What one run directory says about itself; ``status`` is ``ok`` or why it is not. A folder that is no usable
    run (refused at start-up, or no run at all) gets ``recipe`` None and its reason: it is listed, never fatal."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        why = _error_line(path)
        status = f"refused before training: {why}" if why else "not a run directory (no readable config.json)"
        return {"run": str(path), "seed": None, "recipe": None, "settings": None, "status": status}
    data = (config.get("data") or {}).get("name", "?")
    row: dict[str, Any] = {
        "run": str(path),
        "seed": (config.get("train") or {}).get("seed"),
        "recipe": f"{'+'.join(config.get('defenses') or []) or 'clean'} | {data} | {architecture(config)}",
        "settings": settings(config) | {"model.name": json.dumps(architecture(config))},  # auto = what it picked
    }
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return row | {"status": _error_line(path) or "did not finish (no summary.json)"}
    last = summary["table"][0]
    cost = summary.get("cost") or {}
    final = f"{last['model'].split(' (')[0]} epoch, {last['n']} points"
    row |= {
        "status": "ok",
        "clean": last["clean"],
        "pgd": last["robust"],
        "clean_from": final,
        "pgd_from": f"{final}, {last['attack'].split(' (')[0]}",
        "wall_seconds": summary.get("wall_seconds"),
        "train_images_per_second": cost.get("train_images_per_second"),
        "autoattack": None,
    }
    aa = _autoattack(path / "eval")
    if aa is not None:
        row["autoattack"], row["autoattack_from"] = aa
    return row


def _autoattack(folder: Path) -> tuple[float, str] | None:
    """The latest AutoAttack worst case among the run's evaluations, and what it was measured on."""
    reports = sorted(folder.glob("evaluations/*/report.json"), reverse=True) + [folder / "report.json"]
    for path in reports:
        try:
            report = json.loads(path.read_text())
            rows = [r for r in report["rows"] if r["suite"] == "autoattack" and r["kind"] == "group worst case"]
        except (OSError, ValueError, KeyError):
            continue
        if rows:
            m = report.get("meta", {})
            return rows[0]["robust"], f"{Path(str(m.get('target', '?'))).name}, {m.get('n', '?')} points"
    return None


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
    for recipe in dict.fromkeys(r["recipe"] for r in rows if r["recipe"] is not None):
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
                (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))
                if values
                else None
            )
        for m, key in SOURCES.items():  # what each accuracy was measured on, as the runs say
            g[key] = sorted({r[key] for r in done if r.get(key)})
        out.append(g)
    return out


def _escape(text: str) -> str:
    """A markdown table cell: ``|`` would start a new cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """The groups as a markdown table: mean ± std per recipe ("n=1" where one run cannot give a spread); under it,
    what each accuracy column was measured on (checkpoint and points), the failed runs and the unusable folders."""

    def cell(v, pct: bool) -> str:
        if v is None:
            return "–"
        mean, std, n = v
        scale, digits = (100, 2) if pct else (1, 1)
        spread = f" ± {scale * std:.{digits}f}" if std is not None else " (n=1)"
        return f"{scale * mean:.{digits}f}{spread}"

    head = ["recipe", "runs", "failed", "clean %", "PGD %", "AutoAttack %", "wall s", "train img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        lines.append(
            f"| {_escape(g['recipe'])} | {g['runs']} | {g['failed']} | {cell(g['clean'], True)} "
            f"| {cell(g['pgd'], True)} | {cell(g['autoattack'], True)} | {cell(g['wall_seconds'], False)} "
            f"| {cell(g['train_images_per_second'], False)} |"
        )
    sources = []
    for m, title in (("clean", "clean"), ("pgd", "PGD"), ("autoattack", "AutoAttack")):
        said = sorted({s for g in groups for s in g.get(SOURCES[m], [])})
        if said:
            sources.append(f"{title}: {'; '.join(said)}")
    if sources:
        lines += ["", "measured on — " + " · ".join(sources)]
    failed = [r for r in rows if r["status"] != "ok" and r["recipe"] is not None]
    if failed:
        lines += ["", "failed or unfinished runs:"] + [
            f"- {r['run']} (seed {r['seed']}): {r['status']}" for r in failed
        ]
    unusable = [r for r in rows if r["recipe"] is None]
    if unusable:
        lines += ["", "not compared (unusable folders):"] + [f"- {r['run']}: {r['status']}" for r in unusable]
    return "\n".join(lines)


def plot(groups: list[dict[str, Any]], path: Path) -> None:
    """Clean, PGD and AutoAttack accuracy per recipe, mean with the standard deviation as error bars. Each recipe is
    labelled in full (two settings of one stack are told apart); a series no recipe has is left out of the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(groups)
    fig, ax = plt.subplots(figsize=(max(4, 1.9 * len(groups)), 4))
    width = 0.8 / max(1, len(series))
    for k, (m, label, colour) in enumerate(series):
        have = [(i, g) for i, g in enumerate(groups) if g[m]]
        ax.bar(
            [i + (k - (len(series) - 1) / 2) * width for i, _ in have],
            [100 * g[m][0] for _, g in have],
            width,
            yerr=[100 * (g[m][1] or 0.0) for _, g in have],
            label=label,
            color=colour,
            capsize=3,
        )
    ax.set_xticks(range(len(groups)), plot_labels(groups), fontsize=7)
    ax.set_ylabel("accuracy %")
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_series(groups: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The bars to draw: (metric, legend label, colour) for each accuracy at least one recipe has."""
    every = (("clean", "clean", "C0"), ("pgd", "PGD", "C1"), ("autoattack", "AutoAttack", "C2"))
    return [(m, t, c) for m, t, c in every if any(g[m] for g in groups)]


def plot_labels(groups: list[dict[str, Any]]) -> list[str]:
    """Each recipe's whole label, wrapped: two settings of one stack must not read the same."""
    return ["\n".join(textwrap.wrap(g["recipe"], 28)) for g in groups]
