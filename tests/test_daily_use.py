"""Daily-use mismatches (issue 27): what a run reports about itself and whom an error blames."""

import json
from dataclasses import dataclass

import pytest

from regdefense import hookimpl, option
from regdefense.defense import Defense
from regdefense.errors import UserError
from regdefense.run import train
from regdefense.testing import TINY, make_trainer


def test_summary_epochs_counts_the_epochs_trained_not_the_best_one(tmp_path):
    """summary.json said "epochs": 2 for a 3-epoch run whose best checkpoint was epoch 2 (best.pt's state)."""
    res = train(defenses=["none"], overrides=TINY + ["train.epochs=3", "train.lr=8", "train.schedule=constant",
                                                      "eval.select=clean"], out=tmp_path / "run", echo=lambda _m: None)
    labels = [row["model"] for row in res.table]
    assert len(labels) == 2 and labels[0] == "last (epoch 3)", labels  # the setting gives an earlier best epoch
    assert json.loads((res.run_dir / "summary.json").read_text())["epochs"] == 3


class ForgetsToReturn(Defense):
    name = "forgets_to_return"

    @dataclass
    class Config:
        weight: float = option(0.1, "w", ge=0)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield
        terms["extra"] = self.config.weight * terms["task"]  # ... and no `return terms`


def test_a_loss_wrapper_that_forgets_to_return_is_named():
    trainer = make_trainer(["pgd_at", ForgetsToReturn], ["pgd_at.steps=1"])
    with pytest.raises(UserError, match=r"a wrapper that does not return the terms it received: forgets_to_return"):
        trainer.fit()
