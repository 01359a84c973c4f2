"""AWP: adversarial weight perturbation (Wu et al., NeurIPS 2020), around whatever objective is active.

Per batch (after the adversarial inputs are made at the current weights): copy the weights into a
proxy, take one SGD step (``proxy_lr``) that *increases* the active objective on the proxy
(``regdefense_compute_loss`` with ``phase="awp"``; only the proxy receives gradients from this probe), and
for every weight tensor with more than one dimension set v_l = γ·‖w_l‖·(w'_l − w_l)/‖w'_l − w_l‖. The model's loss and
gradients are then computed
at w + v, and the weights are restored exactly (copied back) before the optimizer step. AWP never names
the objective it wraps, so AWP + PGD-AT and AWP + TRADES need no special case.

Defaults: γ = 5e-3 and 10 warm-up epochs are TRADES-AWP's; AT-AWP uses γ = 1e-2 and no warm-up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from regdefense import hookimpl, option
from regdefense.host.defense import Defense


def perturbable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The weight tensors AWP perturbs: parameters with more than one dimension (conv and linear weights)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]


class AWP(Defense):
    """Adversarial weight perturbation on a proxy copy, wrapping forward_backward."""

    name = "awp"

    @dataclass
    class Config:
        gamma: float = option(
            5e-3, "perturbation size relative to each layer's weight norm (TRADES-AWP 5e-3, AT-AWP 1e-2)", ge=0
        )
        warmup_epochs: int = option(
            10, "epochs before the perturbation starts (TRADES-AWP 10, AT-AWP 0)", ge=0, epoch="starts"
        )
        proxy_lr: float = option(0.01, "learning rate of the proxy's ascent step", gt=0)

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.proxy: torch.nn.Module | None = None
        self._warned = False

    @hookimpl
    def regdefense_fit_start(self, trainer):
        self.proxy = copy.deepcopy(trainer.raw_model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=self.config.proxy_lr)

    def perturbation(self, trainer, step) -> dict[str, torch.Tensor]:
        """v per weight tensor: one ascent step of the active objective on the proxy, rescaled layer-wise."""
        assert self.proxy is not None, "regdefense_fit_start builds the proxy"
        self.proxy.load_state_dict(trainer.raw_model.state_dict())
        self.proxy.train()
        terms = trainer.loss_terms(step, self.proxy, phase="awp")
        # gradients of the proxy alone: a backward() would also leave the negated objective's gradient in every
        # other network the objective touches (LBGAT's guide, DYNAT's guide), whose .grad the real update then sums
        params = [p for p in self.proxy.parameters() if p.requires_grad]
        grads = torch.autograd.grad(-sum(terms.values()), params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        trainer.dist.reduce_grads(self.proxy.parameters(), step.batch_size)
        self.proxy_opt.step()
        proxy = dict(self.proxy.named_parameters())
        out = {}
        for name, w in perturbable(trainer.raw_model):
            d = proxy[name].detach() - w.detach()
            out[name] = self.config.gamma * w.detach().norm() * d / (d.norm() + 1e-20)
        return out

    @hookimpl
    def regdefense_epoch_end(self, trainer, epoch, metrics):
        acting = self.config.gamma > 0 and epoch >= self.config.warmup_epochs
        chance = 1.5 / trainer.data.num_classes
        if acting and not self._warned and metrics.get("val_clean", 1.0) <= chance:
            self._warned = True
            trainer.echo(
                f"warning: held-out clean accuracy is {metrics['val_clean']:.1%} (chance level) in epoch "
                f"{epoch + 1} with AWP acting since epoch {self.config.warmup_epochs + 1}: a weight perturbation "
                f"of γ = {self.config.gamma:g} on a network that has not learned yet can hold it at chance (the "
                f"digits CNN stays there from epoch 1). Warm up first (awp.warmup_epochs; TRADES-AWP: 10) or "
                f"lower awp.gamma"
            )

    @hookimpl(wrapper=True)
    def regdefense_forward_backward(self, trainer, step):
        if self.config.gamma == 0 or trainer.state.epoch < self.config.warmup_epochs:
            return (yield)
        v = self.perturbation(trainer, step)
        params = dict(perturbable(trainer.raw_model))
        saved = {n: params[n].detach().clone() for n in v}
        with torch.no_grad():
            for n, dv in v.items():
                params[n].add_(dv)
        step.outputs.clear()  # logits from the unperturbed weights: their graphs die with the in-place change
        try:
            return (yield)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)
