"""``core``: the loop's own defaults, a plugin on the same hooks as every defense (as pytest runs its own features).

Registered by :func:`regdefense.host.discovery.activate` after the stack, every implementation ``trylast``: no attack
(plain
training), cross-entropy, a plain forward/backward, and the trained model as the evaluated one. It reaches the loop
only through the trainer object the hooks pass, so it imports nothing of the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from regdefense.host.contract import APPLIES_WEIGHTS, Key
from regdefense.host.hookspecs import hookimpl
from regdefense.host.step import Step

if TYPE_CHECKING:
    from regdefense.host.interface import Host, TrainingHost


class CorePlugin:
    """The loop's own defaults, registered last as ``core`` (:func:`regdefense.host.discovery.activate`) and run last
    (``trylast``), exactly as a third-party defense would be."""

    name = "core"
    #: counted only for the exclusive hooks core answers (no other objective active)
    publishes = (Key("outputs.adv", "compute_loss"),)
    reads = (APPLIES_WEIGHTS,)

    @hookimpl(trylast=True)
    def regdefense_make_adversarial(self, step: Step) -> Tensor:
        return step.inputs  # no attack: plain training

    @hookimpl(trylast=True)
    def regdefense_compute_loss(self, trainer: TrainingHost, step: Step, model: nn.Module) -> dict[str, Tensor]:
        logits = model(step.adv_inputs)
        step.outputs["adv"] = logits
        return {
            "task": trainer.adv_mean(
                trainer.ce(logits, step.labels if step.targets is None else step.targets, reduction="none"),
                step,
                logits,
            )
        }

    @hookimpl(trylast=True)
    def regdefense_forward_backward(self, trainer: TrainingHost, step: Step) -> Tensor:
        step.losses = trainer.loss_terms(step, trainer.model, "train")
        loss: Any = sum(step.losses.values())
        trainer.backward(loss)
        return loss.detach()

    @hookimpl(trylast=True)
    def regdefense_eval_model(self, trainer: Host) -> nn.Module:
        return trainer.model
