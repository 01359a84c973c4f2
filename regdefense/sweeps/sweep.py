"""Seed × recipe sweeps: ``regdefense sweep RECIPE... --seeds 0 1 2``.

Each recipe (a TOML run file) runs once per seed into ``OUT/<recipe>/seed<k>`` — one after the other here, or, with
``--print``, as the list of ``regdefense train`` commands to hand to a cluster's job array. A sweep started again
skips the runs that finished, resumes the ones that stopped, and retries the ones that failed before writing a
checkpoint. A failed run does not stop the sweep; it is listed with why. With ``--attacks`` each finished run is
also measured by ``regdefense evaluate`` (e.g. ``--attacks autoattack``), so the table has AutoAttack columns. The
table at the end is :mod:`regdefense.sweeps.compare`'s, grouped by recipe file.
"""

from __future__ import annotations

import shlex
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from regdefense.base.errors import UserError, first_line
from regdefense.evaluation.runner import evaluate
from regdefense.sweeps import compare
from regdefense.training.run import train


@dataclass
class Job:
    recipe: str  #: the TOML file ("" for the defaults)
    label: str  #: the recipe's name in the table and the output folder
    seed: int
    out: Path
    overrides: list[str] = field(default_factory=list)

    def command(self, attacks: list[str] | None = None, eval_n: int | None = None) -> str:
        parts = [
            "regdefense",
            "train",
            *(["--config", self.recipe] if self.recipe else []),
            "--seed",
            str(self.seed),
            "--out",
            str(self.out),
            "--quiet",
        ]
        for o in self.overrides:
            parts += ["-o", o]
        line = shlex.join(parts)
        if attacks:
            ev = ["regdefense", "evaluate", str(self.out), "--quiet"] + [a for s in attacks for a in ("--attacks", s)]
            line += " && " + shlex.join(ev + (["--n", str(eval_n)] if eval_n else []))
        return line


def label_of(recipe: str) -> str:
    p = Path(recipe)
    return f"{p.parent.name}-{p.stem}" if p.parent.name not in ("", ".") else p.stem


def plan(recipes: list[str], seeds: list[int], out: str | Path, overrides: list[str] | None = None) -> list[Job]:
    """One job per recipe and seed; recipes must exist and their labels must differ."""
    if not seeds:
        raise UserError("give at least one seed (--seeds 0 1 2)")
    labels: dict[str, str] = {}
    for r in recipes:
        if r and not Path(r).is_file():
            raise UserError(f"recipe {r} does not exist (a TOML run file, e.g. recipes/digits/pgd_at.toml)")
        lab = label_of(r) if r else "defaults"
        if lab in labels:
            raise UserError(f"recipes {labels[lab]} and {r} would share the folder {lab}; rename one")
        labels[lab] = r
    return [
        Job(r, lab, s, Path(out) / lab / f"seed{s}", list(overrides or []))
        for lab, r in labels.items()
        for s in dict.fromkeys(seeds)
    ]


def run(
    jobs: list[Job],
    *,
    attacks: list[str] | None = None,
    eval_n: int | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the jobs in order; return one compare row per job (``status`` ``ok`` or why not), labelled by recipe.
    Each line says which run of how many it is about (``[k/n] LABEL seed S: ...``), its epoch lines included;
    ``progress=False`` keeps only the lines that start and end a run (no bars, no epoch lines)."""
    rows = []
    quiet = [] if progress else ["train.progress=false"]
    for k, job in enumerate(jobs, 1):
        head = f"[{k}/{len(jobs)}] {job.label} seed {job.seed}"
        try:
            if (job.out / "summary.json").exists():
                echo(f"{head}: finished before, kept")
            elif (job.out / "checkpoints" / "last.pt").exists():
                echo(f"{head}: resuming {job.out}")
                train(resume=job.out, overrides=quiet, echo=_prefixed(echo, head))
            else:
                echo(f"{head}: training into {job.out}")
                train(  # a folder left by a run killed before its first checkpoint is started again
                    job.recipe or None,
                    overrides=[*job.overrides, f"train.seed={job.seed}", *quiet],
                    out=job.out,
                    echo=_prefixed(echo, head),
                )
            if attacks and not (job.out / "eval" / "report.json").exists():
                echo(f"{head}: evaluating ({', '.join(attacks)})")
                evaluate(job.out, suites=attacks, n=eval_n, progress=progress)
        except Exception as exc:  # one run's failure is a row of the table, not the end of the sweep
            why = f"{type(exc).__name__}: {first_line(exc)}"
            echo(f"{head}: failed: {why}")
            job.out.mkdir(parents=True, exist_ok=True)
            with open(
                job.out / "error.log", "a"
            ) as fh:  # after any traceback the trainer wrote; the last line says why
                fh.write("".join(traceback.format_exception(exc)) + why + "\n")
        rows.append(_row(job, compare))
    return rows


def _prefixed(echo: Callable[[str], None], head: str) -> Callable[[str], None]:
    return lambda m: echo(f"{head}: {m}")


def _row(job: Job, compare) -> dict[str, Any]:
    row = compare.read_run(job.out)
    if row["recipe"] is None and not job.out.exists():
        row["status"] = "did not start"
    row["recipe"] = job.label  # a run refused before its config was written still belongs to its recipe
    return row
