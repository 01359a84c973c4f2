"""Sweeps on a cluster through submitit: ``regdefense sweep RECIPE... --launcher submitit --partition gpu``.

Each run of the grid (recipe × seed, :func:`regdefense.sweeps.sweep.plan`) becomes one submitit job running exactly what
the local sweep runs for it (:func:`regdefense.sweeps.sweep.run` on that one job: train or resume, then
``--attacks``), so
the folders, the resume rules and the table are the local sweep's. Why submitit rather than our own ``sbatch``
scripts: it is the launcher PyTorch research uses on Slurm, it requeues a pre-empted or timed-out job through a
checkpointing hook, and its local executor runs the same jobs as real processes without Slurm (the tests use it).

Pre-emption: Slurm signals the job (``USR2``, ``signal_delay_s`` before the end); submitit then calls
:meth:`RunJob.checkpoint`, which hands back the same job, and requeues it. The requeued job finds the run's
``checkpoints/last.pt`` and resumes there (the trainer writes it every epoch, and mid-epoch when SIGTERM reaches it
first), so at most the epoch in flight is recomputed; a run that had finished is kept.

Resources come from the options (``--partition``, ``--gpus``, ``--cpus``, ``--mem``, ``--time``), else from the
recipe's ``[slurm]`` table (``partition``, ``gpus``, ``cpus``, ``mem_gb``, ``time_min``), else the defaults below.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from regdefense.base.errors import UserError, first_line
from regdefense.sweeps import sweep

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Resources:
    """What one run asks the scheduler for."""

    partition: str | None = None
    gpus: int = 0
    cpus: int | None = None
    mem_gb: float | None = None
    time_min: int = 24 * 60

    @classmethod
    def of(cls, recipe: str, given: dict[str, Any]) -> Resources:
        """The recipe's ``[slurm]`` table, overridden by the options that were given (not None)."""
        table: dict[str, Any] = {}
        if recipe:
            with open(recipe, "rb") as fh:
                table = dict(tomllib.load(fh).get("slurm") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            valid = ", ".join(sorted(known))
            raise UserError(f"unknown key {', '.join(unknown)} in [slurm] of {recipe}; valid: {valid}")
        return replace(cls(**table), **{k: v for k, v in given.items() if v is not None})

    def parameters(self) -> dict[str, Any]:
        """submitit's AutoExecutor parameters (``slurm_*`` ones are ignored by the local executor)."""
        params: dict[str, Any] = {"timeout_min": self.time_min, "nodes": 1, "tasks_per_node": 1}
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.cpus:
            params["cpus_per_task"] = self.cpus
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        return params


class RunJob:
    """One run of the grid as a submitit job; checkpointable, so a pre-empted job is requeued and resumes."""

    def __init__(self, job: sweep.Job, attacks: list[str] | None, eval_n: int | None) -> None:
        self.job, self.attacks, self.eval_n = job, attacks, eval_n

    def __call__(self) -> dict[str, Any]:
        return sweep.run([self.job], attacks=self.attacks, eval_n=self.eval_n, progress=False)[0]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on pre-emption or time-out: the same job again (its run resumes from ``last.pt``)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.job, self.attacks, self.eval_n))


def submit(
    jobs: list[sweep.Job],
    *,
    folder: str | Path,
    given: dict[str, Any],
    attacks: list[str] | None = None,
    eval_n: int | None = None,
    cluster: str | None = None,
    echo: Callable[[str], None] = print,
) -> list[tuple[sweep.Job, Any]]:
    """Submit every run that has not finished; return ``(job, submitit job)`` pairs (None for a finished run).

    :param given: resources from the command line (None where not given; see :class:`Resources`).
    :param cluster: ``slurm``, ``local`` (real processes on this machine) or None (Slurm when ``sbatch`` is there,
        else local), as submitit's AutoExecutor.
    """
    try:
        import submitit
    except ImportError:  # pragma: no cover - a dependency
        raise UserError("--launcher submitit needs the submitit package: pip install submitit") from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    out: list[tuple[sweep.Job, Any]] = []
    for k, job in enumerate(jobs, 1):
        head = f"[{k}/{len(jobs)}] {job.label} seed {job.seed}"
        if (job.out / "summary.json").exists() and (not attacks or (job.out / "eval" / "report.json").exists()):
            echo(f"{head}: finished before, kept")
            out.append((job, None))
            continue
        executor.update_parameters(name=f"{job.label}-seed{job.seed}", **Resources.of(job.recipe, given).parameters())
        handle = executor.submit(RunJob(job, attacks, eval_n))
        echo(f"{head}: submitted as job {handle.job_id} ({executor.cluster})")
        out.append((job, handle))
    return out


def collect(submitted: list[tuple[sweep.Job, Any]], echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Wait for every job; one compare row per run, as the local sweep gives (a failed job: its row says why)."""
    rows = []
    for job, handle in submitted:
        if handle is not None:
            try:
                handle.result()
            except Exception as exc:  # the job's own failure, or submitit's (killed, not requeued): a row
                echo(f"{job.label} seed {job.seed}: job {handle.job_id} failed: {first_line(exc)}")
        rows.append(sweep._row(job, sweep.compare))
    return rows
