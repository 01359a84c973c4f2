"""AToP: frozen classifier, purifier output in [0,1], masked fraction, RT3 coverage, EOT averaging, the phases."""

import copy

import pytest
import torch
import torch.nn.functional as F

from regdefense.testing import bn_trainer, far_apart, make_trainer
from regdefense_atop.networks import UNetPurifier
from regdefense_atop.transforms import Defended, Purified, RandomTransform


@pytest.mark.parametrize("block, rate, per_sample", [(1, 0.25, False), (2, 0.25, True), (2, 0.5, False)])
def test_masked_fraction_matches_the_config(block, rate, per_sample):
    t = RandomTransform("rt1", block, rate, 0.0, per_sample)
    m = t.masks(torch.zeros(6, 1, 8, 8))
    assert m.shape == ((6 if per_sample else 1), 1, 8, 8)
    assert m.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([rate] * m.shape[0])


def test_rt3_masks_partition_the_image():
    t = RandomTransform("rt3", 2, 0.25, 0.1, n_masks=4)
    masks = t.complementary(torch.zeros(3, 1, 8, 8))
    assert torch.equal(sum(masks), torch.ones_like(masks[0]))  # every pixel missing in exactly one copy
    assert all(m.mean().item() == pytest.approx(0.25) for m in masks)


def test_purifier_output_lies_in_unit_range_and_feeds_the_classifier():
    torch.manual_seed(0)
    purified = Purified(UNetPurifier(1, 8, width=8), RandomTransform("rt2", 1, 0.25, 0.25))
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.flatten(1)[:, :10]

    out = Defended(purified, Spy())(torch.rand(5, 1, 8, 8) * 4 - 2)
    assert out.shape == (5, 10) and seen[0].min() >= 0 and seen[0].max() <= 1


def test_finetuning_leaves_the_classifier_untouched_and_trains_the_purifier(tmp_path):
    trainer = make_trainer(["atop"], ["train.epochs=2", "atop.ce_start_epoch=0", "train.optimizer=adam",
                                      "train.lr=0.001"], run_dir=tmp_path)
    classifier = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    purifier = {k: v.clone() for k, v in trainer.modules["atop_purifier"].state_dict().items()}
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in trainer.raw_model.parameters())
    history = trainer.fit()
    assert all(torch.equal(v, trainer.raw_model.state_dict()[k]) for k, v in classifier.items())
    assert any(not torch.equal(v, trainer.modules["atop_purifier"].state_dict()[k]) for k, v in purifier.items())
    assert {"loss_recon", "loss_task"} <= set(history[-1])
    assert isinstance(trainer.hook.regdefense_eval_model(trainer=trainer), Defended)


def test_classification_term_uses_the_purified_adversarial_input():
    """On a BatchNorm classifier with skewed running statistics: the adversary is FGSM on the frozen classifier in
    eval mode (fixed in code; the classifier is a trained network the purifier protects), and the classification term
    is CE of the classifier in eval mode on the purified adversarial input. A train-mode FGSM would differ."""
    trainer = bn_trainer(["atop"], ["atop.ce_start_epoch=0", "atop.recon_target=clean"])
    x, y, idx = next(iter(trainer.train_loader))
    from regdefense.host.step import Step

    step = Step.from_batch((x[:16], y[:16], idx[:16]), trainer.device)
    classifier = copy.deepcopy(trainer.model)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    eps = trainer.eps

    def fgsm(train):  # one signed step of ε on the summed CE from x, clipped to the image (on a copy: train mode
        net = copy.deepcopy(classifier).train(train)  # would move the running statistics)
        xr = step.inputs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(xr), step.labels, reduction="sum"), xr)
        return (step.inputs + eps * g.sign()).clamp(0, 1)

    assert torch.allclose(step.adv_inputs, fgsm(False), atol=1e-6)
    assert far_apart(step.adv_inputs, fgsm(True), atol=eps)  # the mode is seen
    purifier = trainer.modules["atop_purifier"]
    torch.manual_seed(3)
    terms = trainer.loss_terms(step, trainer.model)
    torch.manual_seed(3)
    p = Purified(purifier, trainer.pm.get_plugin("atop").transform)
    rec = p(step.inputs)
    out = p(step.adv_inputs)
    classifier.eval()
    assert terms["recon"].item() == pytest.approx(F.l1_loss(rec, step.inputs).item(), rel=1e-5)
    assert terms["task"].item() == pytest.approx(0.05 * F.cross_entropy(classifier(out), step.labels).item(), rel=1e-5)


def test_eot_averages_gradients_over_transform_samples():
    """torchattacks' EOTPGD, one step from x: the direction is the sign of the sum of the per-sample gradients."""
    import torchattacks

    torch.manual_seed(0)
    model = Defended(Purified(UNetPurifier(1, 8, width=8), RandomTransform("rt2", 2, 0.25, 0.2)),
                     torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    torch.manual_seed(11)
    adv = torchattacks.EOTPGD(model, eps=0.1, alpha=0.05, steps=1, eot_iter=5, random_start=False)(x, y)
    torch.manual_seed(11)
    total = torch.zeros_like(x)
    for _ in range(5):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y), xi)
        total += g
    assert torch.allclose(adv, (x + 0.05 * total.sign()).clamp(0, 1), atol=1e-6)
    one = torch.zeros_like(x)  # and a single sample would point elsewhere: the randomness matters
    torch.manual_seed(11)
    xi = x.clone().requires_grad_(True)
    (one,) = torch.autograd.grad(F.cross_entropy(model(xi), y), xi)
    assert not torch.equal(one.sign(), total.sign())


def test_pretrain_then_finetune_and_adaptive_evaluation(tmp_path):
    from regdefense.evaluation.runner import evaluate
    from regdefense.training.run import train

    common = ["train.epochs=1", "data.limit=128", "eval.pgd_steps=1", "eval.test_samples=16", "train.progress=false",
              "train.optimizer=adam", "train.lr=0.001"]
    pre = train(defenses=["atop"], overrides=common + ["atop.phase=pretrain"], out=tmp_path / "pre", echo=lambda s: None)
    fine = train(defenses=["atop"], overrides=common + [f"atop.purifier_init={pre.run_dir}", "atop.ce_start_epoch=0"],
                 out=tmp_path / "fine", echo=lambda s: None)
    from regdefense.base import checkpoint

    start = checkpoint.load(pre.run_dir / "checkpoints" / "best.pt")["modules"]["atop_purifier"]
    assert start.keys() == checkpoint.load(fine.run_dir / "checkpoints" / "best.pt")["modules"]["atop_purifier"].keys()
    report, _ = evaluate(fine.run_dir, suites=["bpda-pgd", "eot-pgd"], n=16, check_samples=16, progress=False,
                         adaptive="off")
    labels = {r.label for r in report.rows}
    assert {"BPDA-PGD-20", "PGD-20 EOT-20"} <= labels
    assert report.meta["stack"] == ["atop"]
    assert any(c["name"] == "randomized model without EOT" and c["numbers"]["randomized"] for c in report.checks)
    # the purified model declares its BPDA view; the check attacks through it and measures the real model
    bpda = next(c for c in report.checks if c["name"] == "BPDA (identity) vs white-box")
    assert bpda["status"] != "skip" and bpda["numbers"]["through"] == "the model's declared bpda_model"
