"""The loop: hook order, extra modules, schedules, the ε ramp, checkpoints and exact resume."""

import json
import math

import pytest
import torch
from torch import nn

from regdefense import hookimpl
from regdefense.base import checkpoint
from regdefense.host.discovery import activate
from regdefense.host.hookspecs import EXCLUSIVE
from regdefense.testing import HookRecorder, tiny_config
from regdefense.training.loop import Trainer

ONE_BATCH = ["data.limit=70", "data.val_fraction=0.1", "train.batch_size=64"]


def test_hook_order_of_one_epoch():
    cfg = tiny_config(["pgd_at"], ONE_BATCH + ["pgd_at.steps=1"])
    pm = activate(["pgd_at"], cfg.defense)
    rec = HookRecorder(pm)
    Trainer(cfg, pm=pm).fit()
    names = [n.removeprefix("regdefense_") for n in rec.names]
    assert names == ["add_modules", "batch_replays", "fit_start", "epoch_start", "batch_start", "make_adversarial",
                     "forward_backward", "compute_loss", "before_optimizer_step", "batch_end", "eval_model",
                     "epoch_end", "log_metrics", "fit_end"]
    import regdefense.host.hookspecs as specs
    every = {n for n in dir(specs) if n.startswith("regdefense_")} - {"regdefense_log_summary"}  # run.train's
    assert {"regdefense_" + n for n in names} == every  # the loop calls every hook
    assert set(EXCLUSIVE) <= every


class Guide:
    """Adds a trainable and a frozen network; checks the host moves, optimises and saves them."""

    name = "guide"

    @hookimpl
    def regdefense_add_modules(self, trainer):
        frozen = nn.Linear(2, 2).requires_grad_(False)
        return {"guide": nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "frozen": frozen}

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model, phase):
        terms = yield
        terms["guide"] = nn.functional.cross_entropy(trainer.modules["guide"](step.inputs), step.labels)
        return terms


def test_extra_modules_are_optimised_and_checkpointed(tmp_path):
    cfg = tiny_config(["pgd_at"], ["pgd_at.steps=1"])
    trainer = Trainer(cfg, pm=activate(["pgd_at", Guide()], cfg.defense), run_dir=tmp_path)
    guide = trainer.modules["guide"]
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in guide.parameters())
    assert not any(id(p) in in_opt for p in trainer.modules["frozen"].parameters())
    before = guide[1].weight.detach().clone()
    history = trainer.fit()
    assert not torch.equal(before, guide[1].weight) and "loss_guide" in history[-1]
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert torch.equal(saved["modules"]["guide"]["1.weight"], guide[1].weight.detach())


class EpsProbe:
    name = "eps_probe"

    def __init__(self):
        self.seen = []

    @hookimpl
    def regdefense_batch_start(self, trainer):
        self.seen.append(trainer.eps)


def test_eps_warmup_ramps_linearly_per_batch():
    cfg = tiny_config([], ["train.eps_warmup_epochs=2", "train.epochs=3", "eval.pgd_steps=1"])
    probe = EpsProbe()
    trainer = Trainer(cfg, pm=activate([probe]))
    trainer.fit()
    nb = len(trainer.train_loader)
    expected = [trainer.eps_full * min(1.0, (i / nb) / 2) for i in range(3 * nb)]
    assert probe.seen == pytest.approx(expected)


@pytest.mark.parametrize("schedule, step_mode", [("cosine", "iter"), ("multistep", "epoch"), ("onecycle", "iter"),
                                                 ("constant", "epoch")])
def test_lr_schedules(schedule, step_mode):
    cfg = tiny_config([], [f"train.schedule={schedule}", f"train.schedule_step={step_mode}", "train.epochs=2",
                           "train.milestones=1", "train.lr=0.1", "eval.pgd_steps=1"])
    trainer = Trainer(cfg, pm=activate([]))
    history = trainer.fit()
    nb = len(trainer.train_loader)
    lr_epoch1 = history[0]["lr"]  # the rate of the epoch's last batch
    if schedule == "cosine":
        assert lr_epoch1 == pytest.approx(0.05 * (1 + math.cos(math.pi * (nb - 1) / (2 * nb))))
    elif schedule == "multistep":
        assert lr_epoch1 == pytest.approx(0.1) and history[1]["lr"] == pytest.approx(0.01)
    elif schedule == "constant":
        assert [h["lr"] for h in history] == [0.1, 0.1]
    else:
        assert lr_epoch1 < 0.1 and history[1]["lr"] < 1e-4


def test_adam_optimizer_is_used():
    cfg = tiny_config([], ["train.optimizer=adam", "train.lr=0.001"])
    assert isinstance(Trainer(cfg, pm=activate([])).optimizer, torch.optim.Adam)


def test_run_directory_outputs(tmp_path):
    cfg = tiny_config(["pgd_at"], ["train.epochs=2", "pgd_at.steps=1"])
    trainer = Trainer(cfg, pm=activate(["pgd_at"], cfg.defense), run_dir=tmp_path)
    trainer.fit()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"loss_task", "val_clean", "val_robust", "lr", "epoch_seconds"} <= set(lines[0])
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "checkpoints" / "best.pt").exists()
    best = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best["metrics"]["val_robust"] == max(l["val_robust"] for l in lines)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}


def test_resume_from_epoch_1_checkpoint_gives_identical_weights(tmp_path):
    overrides = ["train.epochs=3", "train.save_every=1", "train.deterministic=true", "pgd_at.steps=2",
                 "train.seed=7", "data.limit=256", "train.schedule=multistep", "train.milestones=0.5"]
    cfg = tiny_config(["pgd_at"], overrides)
    full = Trainer(cfg, pm=activate(["pgd_at"], cfg.defense), run_dir=tmp_path / "a")
    full.fit()
    cfg2 = tiny_config(["pgd_at"], overrides)
    resumed = Trainer(cfg2, pm=activate(["pgd_at"], cfg2.defense), run_dir=tmp_path / "b")
    resumed.resume_from(tmp_path / "a" / "checkpoints" / "epoch-1.pt")
    history = resumed.fit()
    assert [h["epoch"] for h in history] == [2, 3]
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    class Poison:
        name = "poison"

        @hookimpl(wrapper=True)
        def regdefense_compute_loss(self):
            terms = yield
            terms["bad"] = terms["task"] * float("nan")
            return terms

    cfg = tiny_config([], [])
    trainer = Trainer(cfg, pm=activate([Poison()]), run_dir=tmp_path)
    from regdefense.base.errors import UserError

    with pytest.raises(UserError, match=r"bad became NaN or infinite at epoch 1, batch 1 "):
        trainer.fit()


def test_best_checkpoint_follows_clean_accuracy_without_an_adversary(tmp_path):
    cfg = tiny_config([], ["train.epochs=3", "eval.pgd_steps=1"])
    trainer = Trainer(cfg, pm=activate([]), run_dir=tmp_path)
    history = trainer.fit()
    best = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best["metrics"]["val_clean"] == max(h["val_clean"] for h in history)
