"""Run under ``torchrun --nproc-per-node N`` by tests/test_scale.py (or alone, as the 1-process baseline).

``python eval_worker.py WEIGHTS OUT DUMP SUITE[,SUITE...] N BATCH [die]``: evaluates a digits_cnn state_dict at
ε = 0.3 into OUT; the process
that writes the report saves every row's per-point results, the checks' and the clean ones to DUMP. With ``die``,
rank 1 kills itself (SIGKILL, no clean-up) as the second attack starts: a pre-empted node.
"""

import os
import signal
import sys

import torch

from regdefense.base import distributed
from regdefense.evaluation import shards
from regdefense.evaluation.runner import evaluate

target, out, dump, suites, n, batch = sys.argv[1:7]
torch.set_num_threads(1)
if sys.argv[7:] == ["die"] and os.environ.get("RANK") == "1":
    real, calls = shards.attack_shared, []

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # the first attack is finished and its progress saved on every rank
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)

    shards.attack_shared = dying

rep, files = evaluate(
    target,
    arch="digits_cnn",
    out=out,
    suites=suites.split(","),
    n=int(n),
    batch_size=int(batch),
    eps=0.3,
    device="cpu",
    progress=os.environ.get("RANK", "0") == "0",
    surrogate=None,
    check_samples=8,
)
if files:
    torch.save(
        {
            "rows": {f"{r.suite}|{r.label}": r.points for r in rep.rows if r.points is not None},
            "checks": rep.check_points,
            "clean": rep.clean_points,
            "n": rep.meta["n"],
        },
        dump,
    )
    print(f"rank {os.environ.get('RANK', '-')} wrote the report", flush=True)
distributed.finish(wait=False)
