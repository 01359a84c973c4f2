"""Mixed precision on the CPU's autocast (the same code path a GPU takes): bf16, fp16 with a GradScaler, and
the inner attack in fp32 on request."""

import pytest
import torch

from regdefense import hookimpl
from regdefense.base import checkpoint
from regdefense.host.discovery import activate
from regdefense.testing import tiny_config
from regdefense.training.loop import Trainer


class InStep:
    """Marks when the loop is inside a training step (not the held-out check, which runs in fp32)."""

    name = "in_step"
    active = False

    @hookimpl
    def regdefense_batch_start(self):
        InStep.active = True

    @hookimpl
    def regdefense_batch_end(self):
        InStep.active = False


def _trainer(overrides, run_dir=None):
    cfg = tiny_config(["pgd_at"], overrides)
    trainer = Trainer(cfg, pm=activate(["pgd_at", InStep()], cfg.defense), run_dir=run_dir)
    seen = []  # (training mode, output dtype) of every forward of the model inside a training step

    def record(module, _inputs, output):
        if InStep.active:
            seen.append((module.training, output.dtype))

    trainer.raw_model.register_forward_hook(record)
    return trainer, seen


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_forwards_in_half_precision_and_keeps_weights_and_losses_fp32(amp, dtype):
    trainer, seen = _trainer([f"train.amp={amp}", "eval.pgd_steps=1"])
    history = trainer.fit()
    assert {d for training, d in seen if training} == {dtype}  # the training forward
    assert {d for training, d in seen if not training} == {dtype}  # the attack's forwards (eval mode), by default
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert trainer.scaler.is_enabled() == (amp == "fp16")


def test_attack_fp32_runs_the_attack_in_full_precision_and_training_in_bf16():
    trainer, seen = _trainer(["train.amp=bf16", "train.attack_fp32=true", "eval.pgd_steps=1"])
    trainer.fit()
    assert {d for training, d in seen if training} == {torch.bfloat16}
    assert {d for training, d in seen if not training} == {torch.float32}


def test_the_fp16_grad_scaler_state_is_checkpointed_and_restored(tmp_path):
    trainer, _ = _trainer(["train.amp=fp16", "train.epochs=1"], run_dir=tmp_path)
    trainer.fit()
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["scaler"]["scale"] == trainer.scaler.get_scale()
    again, _ = _trainer(["train.amp=fp16", "train.epochs=2"], run_dir=tmp_path / "b")
    again.resume_from(tmp_path / "checkpoints" / "last.pt")
    again.restore_state(again.checkpoints.pending)
    assert again.scaler.get_scale() == trainer.scaler.get_scale()
