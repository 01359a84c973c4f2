"""Options for large global batches: gradient accumulation, the linear LR scaling rule, AdamW, SyncBatchNorm."""

import pytest
import torch

from regdefense.base.errors import ConfigError
from regdefense.testing import make_trainer

# digits_cnn has neither BatchNorm nor dropout, so a batch split in two gives the same gradient as the whole
EXACT = ["train.deterministic=true", "train.epochs=2", "model.name=digits_cnn", "data.limit=200",
         "train.schedule=cosine"]


def test_two_accumulated_batches_of_32_train_as_one_batch_of_64():
    whole = make_trainer([], [*EXACT, "train.batch_size=64"])
    whole.fit()
    parts = make_trainer([], [*EXACT, "train.batch_size=32", "train.accumulate=2"])
    parts.fit()
    assert parts.steps_per_epoch == whole.steps_per_epoch == len(whole.train_loader)  # the schedule's length
    a, b = whole.raw_model.state_dict(), parts.raw_model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # the last group holds 2 batches of 32 and 13 samples: weighted by size, not averaged as equals
    assert whole.history[-1]["lr"] == pytest.approx(parts.history[-1]["lr"])
    # and it is not a no-op: one batch of 32 without accumulation trains differently
    single = make_trainer([], [*EXACT, "train.batch_size=32"])
    single.fit()
    c = single.raw_model.state_dict()
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


def test_accumulation_works_with_per_sample_buffers_and_weight_perturbation():
    trainer = make_trainer(["fgsm_pgk", "awp"], ["train.batch_size=32", "train.accumulate=3", "awp.warmup_epochs=0"])
    history = trainer.fit()
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    written = trainer.pm.get_plugin("fgsm_pgk").prior.flatten(1).abs().sum(1) > 0
    assert written.sum() >= trainer.train_size - 32  # every micro-batch's rows were written at its batch end


def test_linear_lr_scaling_and_adamw():
    t = make_trainer([], ["train.batch_size=64", "train.accumulate=2", "train.lr=0.1", "train.lr_scaling=linear",
                          "train.lr_base_batch=256", "train.optimizer=adamw", "train.weight_decay=0.05",
                          "train.schedule=constant"])
    assert t.peak_lr == pytest.approx(0.1 * 128 / 256)
    assert isinstance(t.optimizer, torch.optim.AdamW) and t.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert t.optimizer.param_groups[0]["weight_decay"] == 0.05
    assert make_trainer([], ["train.batch_size=64", "train.lr=0.1"]).peak_lr == 0.1  # no scaling by default


def test_sync_batchnorm_only_where_torch_can_run_it():
    from regdefense.training.loop import Trainer

    trainer = make_trainer([], ["model.name=digits_cnn_bn", "train.sync_bn=on"])
    assert trainer.sync_bn is False  # one process: nothing to synchronise

    class TwoProcesses:
        enabled, world, rank = True, 2, 0

    trainer.dist = TwoProcesses()
    with pytest.raises(ConfigError, match="sync_bn=on needs CUDA processes"):
        Trainer.sync_bn.func(trainer)
    trainer.config.train.sync_bn = "auto"
    assert Trainer.sync_bn.func(trainer) is False  # auto on CPUs: each process keeps its own statistics
