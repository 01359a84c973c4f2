"""Free-AT, "adversarial training for free" (Shafahi et al., NeurIPS 2019), as Wong et al.'s ``train_free.py`` runs it.

Each minibatch is replayed ``m`` times in a row (the host's ``regdefense_batch_replays`` hook); every replay trains on
x + δ and, from the same backward pass, moves the perturbation: δ ← clip_ε(δ + ε·sign ∇_δ CE), then the rows of the
current batch are clipped into the image range. δ is one buffer of the batch's shape, carried from replay to replay
and from batch to batch (it starts at zero and is never reset), so the adversary costs no extra pass. The
reference divides its epochs by ``m`` (the same number of updates as ``m`` times fewer epochs of plain training).

The replayed forward sees x + δ without clipping it first: a batch's first replay uses the δ left by the previous
batch, clipped to that batch's image range, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regdefense import hookimpl, option
from regdefense.base.errors import ConfigError
from regdefense.host.contract import adversary
from regdefense.host.defense import Defense, resolve_eps

#: defenses whose backward is not the trained network's: Free-AT's δ would climb another network's loss
NOT_WITH = {
    "awp": "AWP computes the training backward at perturbed weights w + v, so Free-AT's δ, which reuses that "
    "backward, would climb the loss of the perturbed network instead of the trained one",
}


class FreeAT(Defense):
    """Minibatch replay m; δ carried across replays and batches, updated from the training backward."""

    name = "free_at"
    publishes = adversary("info.x_init")
    single_step = True
    norms = ("linf",)

    @dataclass
    class Config:
        replays: int = option(8, "m: times each minibatch is replayed (Shafahi et al.: 8 at ε = 8/255)", ge=1)
        eps: float | None = option(None, "perturbation budget ε, also the step (none: the run's threat.eps)", ge=0)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.delta: torch.Tensor | None = None
        self.adv: torch.Tensor | None = None

    @hookimpl
    def regdefense_batch_replays(self, trainer):
        return self.config.replays

    @hookimpl
    def regdefense_fit_start(self, trainer):
        for name, _ in trainer.pm.list_name_plugin():
            if name in NOT_WITH:
                raise ConfigError(f"free_at cannot stack with {name}: {NOT_WITH[name]}")

    @hookimpl
    def regdefense_make_adversarial(self, trainer, step, model):
        x = step.inputs
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or len(self.delta) < len(x):
            self.delta = torch.zeros_like(x)  # the reference's zeros(batch_size, C, H, W)
        step.info["x_init"] = (x + self.delta[: len(x)]).detach()
        self.adv = (x + self.delta[: len(x)]).requires_grad_(True)  # the training backward fills adv.grad
        return self.adv

    @hookimpl
    def regdefense_batch_end(self, trainer, step):
        adv, eps = self.adv, resolve_eps(trainer, self.config.eps)
        if adv is None or adv.grad is None or self.delta is None:
            return
        x, n = step.inputs, len(step.inputs)
        with torch.no_grad():
            grad = torch.zeros_like(self.delta)
            grad[:n] = adv.grad
            self.delta = (self.delta + eps * grad.sign()).clamp(-eps, eps)
            self.delta[:n] = torch.max(torch.min(self.delta[:n], 1 - x), -x)
        self.adv = None

    def state_dict(self):
        return {"delta": self.delta} if self.delta is not None else {}

    def load_state_dict(self, state):
        self.delta = state.get("delta")
