"""Fault injection at random moments: kill -9 during `regdefense train` and `regdefense evaluate`, resumed until done,
compared with an uninterrupted run; two writers at once. Prints one table row per scenario.

    python benchmarks/faults.py --trials 3 --kills 3 --seed 0

- train: a PGD-AT run (deterministic kernels, crop+flip, several epochs) is killed with SIGKILL at random times after it
  started writing, then resumed with `train --resume` (after a kill before the first checkpoint: started again with the
  same `train --out`), until it finishes. Passes when `last.pt`'s weights equal the uninterrupted run's bit for bit and
  `metrics.jsonl` holds each epoch once.
- evaluate: a long PGD evaluation of that model is killed with SIGKILL at random times and started again with the same
  command until it finishes. Passes when its per-point results equal an uninterrupted evaluation's and the ledger
  holds the attack once.
- two writers: two `train --out SAME` started together: exactly one runs, the other is refused naming the holder.

The tests in tests/test_faults.py cause each fault once at a chosen point; this script draws the points at random.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from regdefense.base import checkpoint

TRAIN = ["-o", "train.epochs=6", "-o", "data.limit=480", "-o", "train.deterministic=true", "-o",
         "data.augment=crop_flip", "-o", "eval.test_samples=64", "-o", "eval.val_samples=32", "--quiet"]
ATTACK = "torchattacks:PGD(eps=0.2, alpha=0.02, steps=60)"


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "regdefense", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_with_kills(args_first: list[str], args_again: list[str], cwd: Path, kills: int, rng: random.Random,
                   window: tuple[float, float]) -> tuple[int, int, float]:
    """Start, kill -9 after a random delay, start again ... ``kills`` times; then let it finish. Returns (kills done,
    exit status of the last start, seconds)."""
    started, done, args = time.time(), 0, args_first
    for _ in range(kills):
        proc = cli(*args, cwd=cwd)
        try:
            proc.wait(timeout=rng.uniform(*window))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done += 1
        else:
            break  # it finished before the kill
        args = args_again(cwd) if callable(args_again) else args_again
    proc = cli(*(args_again(cwd) if callable(args_again) else args_again), cwd=cwd)
    _, err = proc.communicate()
    if proc.returncode:
        print(err, file=sys.stderr)
    return done, proc.returncode, time.time() - started


def train_trial(work: Path, kills: int, rng: random.Random, reference: dict) -> dict:
    out = work / "cut"

    def again(_cwd):  # resume when a checkpoint exists, else start the same run again
        last = out / "checkpoints" / "last.pt"
        return ["train", "--resume", str(out), "--quiet"] if last.exists() else ["train", "--out", str(out), *TRAIN]

    done, code, seconds = run_with_kills(["train", "--out", str(out), *TRAIN], again, work, kills, rng, (3.0, 14.0))
    weights = checkpoint.load(out / "checkpoints" / "last.pt")["model"] if code == 0 else {}
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
    same = code == 0 and all(torch.equal(weights[k], reference[k]) for k in reference)
    return {"scenario": "train", "kills": done, "exit": code, "identical": same,
            "metrics once": epochs == list(range(1, 7)), "seconds": seconds}


def eval_trial(work: Path, run: Path, kills: int, rng: random.Random, reference: list) -> dict:
    out = work / "eval"
    args = ["evaluate", str(run), "--out", str(out), "--n", "200", "--no-checks", "--quiet", "--attacks", ATTACK]
    done, code, seconds = run_with_kills(args, args, work, kills, rng, (4.0, 12.0))
    attacks = [a for e in _entries(out) for a in e["attacks"]] if code == 0 else []
    same = code == 0 and _broken(out) == reference
    return {"scenario": "evaluate", "kills": done, "exit": code, "identical": same,
            "metrics once": len(attacks) == len(set(attacks)) == 1, "seconds": seconds}


def _entries(out: Path) -> list:
    return list(json.loads((out / "ledger.json").read_text())["entries"].values())


def _broken(out: Path) -> dict:
    """Per point: which attack broke it (or None), from the ledger copy beside the report."""
    (entry,) = _entries(out)
    return {i: p["broken_by"] for i, p in entry["points"].items()}


def two_writers(work: Path) -> dict:
    out = work / "both"
    procs = [cli("train", "--out", str(out), *TRAIN, cwd=work) for _ in range(2)]
    results = [p.communicate() + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    refused = [r for r in results if r[2] == 2 and "in use by another process" in r[1]]
    return {"scenario": "two writers", "kills": 0, "exit": codes, "identical": codes == [0, 2] and len(refused) == 1,
            "metrics once": len((out / "metrics.jsonl").read_text().splitlines()) == 6, "seconds": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--kills", type=int, default=3, help="kill -9 per trial")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="regdefense-faults-"))
    os.environ["REGDEFENSE_LEDGER"] = str(root / "ledgers")
    try:
        whole = cli("train", "--out", str(root / "whole"), *TRAIN, cwd=root)
        assert whole.wait() == 0, whole.communicate()[1]
        reference = checkpoint.load(root / "whole" / "checkpoints" / "last.pt")["model"]
        ev = cli("evaluate", str(root / "whole"), "--out", str(root / "eval-whole"), "--n", "200", "--no-checks",
                 "--quiet", "--attacks", ATTACK, cwd=root)
        assert ev.wait() == 0, ev.communicate()[1]
        points = _broken(root / "eval-whole")
        rows = []
        for t in range(a.trials):
            work = root / f"trial{t}"
            work.mkdir()
            rows.append(train_trial(work, a.kills, rng, reference))
            os.environ["REGDEFENSE_LEDGER"] = str(work / "ledgers")
            rows.append(eval_trial(work, root / "whole", a.kills, rng, points))
            print(rows[-2], rows[-1], flush=True)
        rows.append(two_writers(root))
        print(f"\n{'scenario':12s} {'kill -9':>7s} {'exit':>8s} {'identical':>9s} {'no dup.':>7s} {'s':>6s}")
        for r in rows:
            print(f"{r['scenario']:12s} {r['kills']:7d} {str(r['exit']):>8s} {str(r['identical']):>9s} "
                  f"{str(r['metrics once']):>7s} {r['seconds']:6.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
