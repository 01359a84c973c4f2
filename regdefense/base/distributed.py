"""Data-parallel training on torch.distributed: ``torchrun --nproc-per-node N -m regdefense train``.

Each process takes a contiguous slice of every global batch (the loader's permutation is the same on
all ranks, so ``step.index`` holds global dataset indices) and computes its gradients locally; one
bucketed all-reduce per step then gives every rank the gradient of the *global* batch mean, weighted by
slice size, so N processes take the same optimizer step one process would on the whole batch.

Why not the ``DistributedDataParallel`` wrapper: an adversarial step calls the model a dozen times
(attack iterations, clean and adversarial passes, AWP's proxy, a guide network) and some inner
maximisations accumulate parameter gradients of their own (ART's attacks, AWP's ascent step). The
wrapper would all-reduce, or refuse, those. Reducing once, after the outer backward and over every
trainable network the stack added, is DDP's arithmetic without those traps. Defenses that step their
own optimizer (AWP's proxy, AToP's discriminator) call :meth:`Dist.reduce_grads` on its parameters;
defenses with per-sample buffers write them through :meth:`Dist.set_rows` so every rank holds the
same buffer.

With one process every method is a no-op or a local operation, so the loop reads the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from regdefense.base.errors import UserError


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Dist:
    """The run's process group (or its absence): rank, world size and the few collectives the loop uses."""

    def __init__(self) -> None:
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes checkpoints."""
        return self.rank == 0

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch's indices."""
        return idx.tensor_split(self.world)[self.rank] if self.enabled else idx

    def reduce_grads(self, params: Iterable[nn.Parameter], local_n: int) -> None:
        """Replace each gradient by the slice-size-weighted mean over ranks, in one all-reduce.

        A rank's gradient is that of its slice's mean loss; ``Σ_r n_r·g_r / Σ_r n_r`` is the gradient of
        the global batch mean. Parameters without a gradient on every rank are left alone.
        """
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_ones(1)]).mul_(float(local_n))
        dist.all_reduce(flat)
        flat = flat[:-1].div_(flat[-1])
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def set_rows(self, buffer: Tensor, index: Tensor, values: Tensor) -> None:
        """``buffer[index] = values`` on every rank, for the rows every rank wrote this step."""
        if not self.enabled:
            buffer[index.to(buffer.device)] = values.to(buffer.device, buffer.dtype)
            return
        width = -(-int(self.batch_size) // self.world)  # every slice holds at most this many rows
        where = values.device  # the collective runs where the values are (a buffer may live in host memory)
        idx = torch.full((width,), -1, dtype=torch.long, device=where)
        val = torch.zeros((width, *values.shape[1:]), dtype=values.dtype, device=where)
        idx[: len(index)], val[: len(index)] = index, values
        all_idx = [torch.empty_like(idx) for _ in range(self.world)]
        all_val = [torch.empty_like(val) for _ in range(self.world)]
        dist.all_gather(all_idx, idx)
        dist.all_gather(all_val, val)
        idx, val = torch.cat(all_idx), torch.cat(all_val)
        keep = idx >= 0
        buffer[idx[keep].to(buffer.device)] = val[keep].to(buffer.device, buffer.dtype)

    batch_size: int = 1  #: the global batch size, set by the trainer (bounds a slice for :meth:`set_rows`)
    device: torch.device = torch.device("cpu")  #: where collectives' tensors live (the rank's GPU under NCCL)

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """Overwrite ``tensor`` with rank 0's copy (for state a defense draws at random, such as an initial prior)."""
        if self.enabled:
            dist.broadcast(tensor, 0)
        return tensor

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of a plugin's scalars (for ``metrics`` added in ``regdefense_epoch_end``, which each
        process computes on its own share): every rank must call it with the same keys. One all-reduce."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        device = getattr(self, "device", None) or torch.device("cpu")
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))

    def average_buffers(self, modules: Iterable[nn.Module]) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks."""
        if not self.enabled:
            return
        for module in modules:
            for b in module.buffers():
                if b.is_floating_point():
                    dist.all_reduce(b)
                    b.div_(self.world)

    def check_in_sync(self, modules: dict[str, nn.Module]) -> None:
        """Raise if the processes' weights have drifted apart (a defense updating state on one rank only).

        Compares a float64 sum per network over ranks: one small all-gather per epoch.
        """
        if not self.enabled:
            return
        names = sorted(modules)
        local = torch.stack(
            [
                sum(
                    (p.detach().double().sum() for p in modules[n].parameters()),
                    torch.zeros((), dtype=torch.float64, device=self.device),
                )
                for n in names
            ]
        )
        every = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(every, local)
        table = torch.stack(every).cpu()
        drift = (table - table[0]).abs().amax(0) > 1e-6 * table[0].abs().clamp_min(1.0)
        if bool(drift.any()):
            bad = [n for n, d in zip(names, drift.tolist()) if d]
            raise UserError(
                f"the {self.world} processes' weights of {', '.join(bad)} have drifted apart; a defense "
                f"updates state on one process only (per-sample buffers must go through "
                f"trainer.dist.set_rows, extra optimizers through trainer.dist.reduce_grads)"
            )

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (the run directory's name, for one)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init(device_type: str | None = None) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs); a no-op for one process."""
    if launched() and dist.is_available() and not dist.is_initialized():
        cuda = device_type != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist()


def shutdown(wait: bool = True) -> None:
    """Leave the process group, all processes together (``wait=False``: each when it is done, for work where no
    collective follows, such as an evaluation's rank 0 running the checks while the others have finished)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def finish(code: int = 0, wait: bool = True) -> None:
    """End a torchrun worker process now, after flushing its output.

    Gloo's worker threads can outlive ``destroy_process_group`` and abort the interpreter's own shutdown
    ("terminate called without an active exception", pytorch/pytorch#190489); a launched process
    that has finished its work skips that shutdown. A no-op outside torchrun.
    """
    if not launched():
        return
    import sys

    shutdown(wait)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
