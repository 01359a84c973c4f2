"""Evaluation points per second with 1 and 2 processes (torchrun, gloo) on this machine, same points, same results.

    python benchmarks/eval_scale.py [--weights FILE --arch digits_cnn] [--n 256] [--batch-size 32] [--suites quick]

Without ``--weights`` it first trains the default digits run (PGD-AT, ``--epochs`` epochs) in a temporary folder.
Each setting runs ``regdefense evaluate`` as a user would (no checks, its own ledger): one process with every core's
threads, one process with one thread, and ``torchrun --nproc-per-node 2`` with one thread each. Points/s counts the
attacks' time (the report's per-attack seconds: on rank 0 these include waiting for the other rank), so start-up and
report writing are left out; the end-to-end wall time is printed beside it. "same" says whether every point's
verdict (the ledger's ``broken_by``) equals the first setting's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="a state_dict file (default: train the default digits run)")
    ap.add_argument("--arch", default="digits_cnn")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--suites", default="quick", help="comma-separated")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the digits run trained without --weights")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval-scale-"))
    base = {**os.environ}
    base.pop("WORLD_SIZE", None)
    if args.weights:
        weights = ["evaluate", str(Path(args.weights).resolve()), "--arch", args.arch]
    else:
        run(
            [
                sys.executable,
                "-m",
                "regdefense",
                "train",
                "--quiet",
                "--epochs",
                str(args.epochs),
                "--device",
                "cpu",
                "--out",
                "run",
            ],
            base,
            work,
        )
        weights = ["evaluate", "run"]
    common = [
        *weights,
        "--n",
        str(args.n),
        "--batch-size",
        str(args.batch_size),
        "--no-checks",
        "--quiet",
        "--device",
        "cpu",
        *[a for s in args.suites.split(",") for a in ("--attacks", s)],
    ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "0",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
    ]
    settings = {
        f"1 process, {os.cpu_count()} threads": ([sys.executable, "-m", "regdefense"], {}),
        "1 process, 1 thread": ([sys.executable, "-m", "regdefense"], {"OMP_NUM_THREADS": "1"}),
        # `--`: torchrun's own parser would take `--n` for an abbreviation of its options
        "2 processes (torchrun), 1 thread each": ([*torchrun, "-m", "regdefense", "--"], {"OMP_NUM_THREADS": "1"}),
    }
    first = None
    print(f"{args.n} digits points, suites {args.suites}, batch {args.batch_size}, torch on {os.cpu_count()} CPUs")
    print(f"{'setting':40s} {'points/s':>9s} {'attack s':>9s} {'wall s':>8s}  same")
    for k, (label, (head, extra)) in enumerate(settings.items()):
        out = work / f"eval{k}"
        env = base | extra | {"REGDEFENSE_LEDGER": str(work / f"ledger{k}")}
        wall = run([*head, *common, "--out", str(out)], env, work)
        report = json.loads((out / "report.json").read_text())
        attack_s = sum(r["seconds"] for r in report["rows"] if r["kind"] in ("attack", "cascade step"))
        points = {
            i: p["broken_by"]
            for e in json.loads((out / "ledger.json").read_text())["entries"].values()
            for i, p in e["points"].items()
        }
        first = points if first is None else first
        print(f"{label:40s} {args.n / attack_s:9.1f} {attack_s:9.2f} {wall:8.1f}  {points == first}")


if __name__ == "__main__":
    main()
