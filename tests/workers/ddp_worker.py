"""Run under ``torchrun --nproc-per-node N`` by tests/test_distributed.py (or alone, as the 1-process baseline).

``python ddp_worker.py MODE OUT_JSON``; rank 0 writes what the test compares.
"""

import json
import sys

import torch
import torch.distributed as dist

from regdefense import hookimpl
from regdefense.base import distributed
from regdefense.host.discovery import activate
from regdefense.testing import tiny_config
from regdefense.training.loop import Trainer


class Drift:
    """A defense that (wrongly) changes weights differently on each process."""

    name = "drift"

    @hookimpl
    def regdefense_batch_end(self, trainer, step):
        with torch.no_grad():
            next(trainer.raw_model.parameters()).add_(1e-3 * (trainer.dist.rank + 1))


def gather(t):
    """Every rank's copy of ``t`` (just ``[t]`` for one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def main(mode: str, out: str) -> None:
    # the same global batch of 64 for every world size; deterministic kernels; no random start in clean mode
    base = ["train.deterministic=true", "data.limit=256", "train.batch_size=64", "train.epochs=2"]
    result = {}
    if mode == "clean":
        cfg = tiny_config([], base)
        trainer = Trainer(cfg, pm=activate([]))
        trainer.fit()
        result["weights"] = {k: v.tolist() for k, v in trainer.raw_model.state_dict().items()}
        result["history"] = trainer.history
    elif mode == "buffers":  # per-sample buffers (FGSM-PGK's prior) and an extra optimizer (AWP's proxy)
        cfg = tiny_config(["fgsm_pgk", "awp"], base + ["awp.warmup_epochs=0"])
        trainer = Trainer(cfg, pm=activate(["fgsm_pgk", "awp"], cfg.defense))
        trainer.fit()
        prior = trainer.pm.get_plugin("fgsm_pgk").prior
        result["prior_equal_on_all_ranks"] = all(torch.equal(p, prior) for p in gather(prior))
        result["prior_rows_written"] = int((prior.flatten(1).abs().sum(1) > 0).sum())
        flat = torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])
        result["weights_equal_on_all_ranks"] = all(torch.equal(w, flat) for w in gather(flat))
        result["history"] = trainer.history
        result["mean"] = trainer.dist.mean({"rank": float(trainer.dist.rank), "one": 1.0})  # a plugin's scalars
    elif mode.startswith("stack:"):  # any stack; every network, extra ones included, must agree across ranks
        stack = mode.split(":", 1)[1].split("+")
        cfg = tiny_config(stack, base)
        trainer = Trainer(cfg, pm=activate(stack, cfg.defense))
        trainer.fit()
        nets = {"model": trainer.raw_model, **trainer.modules}
        result["networks"] = sorted(nets)
        result["equal_on_all_ranks"] = {
            n: all(torch.equal(w, f) for w in gather(f))
            for n, f in ((n, torch.cat([p.detach().flatten() for p in m.parameters()])) for n, m in nets.items())}
    elif mode.startswith("stream:"):  # a streamed image folder: which global indices each process trained on
        class Seen:
            name = "seen"

            def __init__(self):
                self.by_epoch = {}

            @hookimpl
            def regdefense_batch_end(self, trainer, step):
                self.by_epoch.setdefault(trainer.state.epoch, []).extend(step.index.tolist())

        seen = Seen()
        cfg = tiny_config([], base[:1] + [f"data.name={mode.split(':', 1)[1]}", "data.stream=on", "data.workers=1",
                                          "data.image_size=12", "data.augment=imagenet", "data.val_fraction=0",
                                          "train.batch_size=16", "train.epochs=2", "data.limit=1000000",
                                          "model.name=digits_cnn"])
        trainer = Trainer(cfg, pm=activate([seen]))
        trainer.fit()
        result["n"] = len(trainer.data.train)
        result["epochs"] = {str(e): sum((g.tolist() for g in gather(torch.tensor(v))), [])
                            for e, v in seen.by_epoch.items()}
        flat = torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])
        result["weights_equal_on_all_ranks"] = all(torch.equal(w, flat) for w in gather(flat))
    elif mode == "drift":
        cfg = tiny_config([], base)
        trainer = Trainer(cfg, pm=activate([Drift()]))
        try:
            trainer.fit()
            result["error"] = None
        except Exception as exc:  # noqa: BLE001 - the test reads the message
            result["error"] = str(exc)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    distributed.finish()  # leave the process group and the process cleanly


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
