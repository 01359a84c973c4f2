"""PGD-10 adversarial-training throughput: regdefense next to a hand-written loop doing identical work.

Same model (architecture and initial weights), data order, batch size, PGD settings (L∞, random
start, eval-mode attack, 10 steps), optimizer and per-batch schedule. The contenders run interleaved
in one process, round after round, so machine noise hits them alike; the table shows the median
images/s and the ratios to the hand-written loop and to ART (the median of each round's ratio). For scale it also times torchattacks' PGD in
the same plain loop and ART's AdversarialTrainerMadryPGD on the same data. Peak memory is each
contender's peak resident set over one epoch, measured in a fresh process of its own (``--peak NAME``).

    python benchmarks/throughput.py                 # embedded digits, digits_cnn, batch 128
    python benchmarks/throughput.py --rounds 7 --no-art
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from regdefense.attacks.adapter import model_mode
from regdefense.data.sources import BatchLoader
from regdefense.host.discovery import activate
from regdefense.training.loop import Trainer
from regdefense.training.run import load_config


def make_trainer(args) -> Trainer:
    cfg = load_config(defenses=["pgd_at"], overrides=[
        f"train.batch_size={args.batch_size}", "train.epochs=1000", "train.progress=false", "train.device=cpu",
        "data.val_fraction=0", f"model.name={args.model}", "pgd_at.steps=10", f"train.seed={args.seed}"])
    return Trainer(cfg, pm=activate(cfg.defenses, cfg.defense))


def regdefense_epoch(trainer: Trainer) -> None:
    trainer.config.train.epochs = trainer.state.epoch + 1
    trainer.fit()


class HandWritten:
    """The plain PyTorch loop a researcher would write for PGD-AT (optionally with torchattacks' PGD)."""

    def __init__(self, trainer: Trainer, use_torchattacks: bool = False) -> None:
        t = trainer.config.train
        self.model = copy.deepcopy(trainer.raw_model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.loader = BatchLoader(trainer.data.train, t.batch_size, seed=t.seed)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=1000 * len(self.loader))
        self.eps, self.steps = trainer.eps_full, 10
        self.alpha = 2.5 * self.eps / self.steps
        self.epoch = 0
        self.ta = None
        if use_torchattacks:
            import torchattacks

            self.ta = torchattacks.PGD(self.model, eps=self.eps, alpha=self.alpha, steps=self.steps)

    def pgd(self, x, y):
        delta = torch.empty_like(x).uniform_(-self.eps, self.eps)
        delta = (x + delta).clamp(0, 1) - x
        with model_mode(self.model, False):
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(self.model(x + delta), y, reduction="sum")
                (g,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + self.alpha * g.sign()).clamp(-self.eps, self.eps)
                delta = (x + delta).clamp(0, 1) - x
        return (x + delta).detach()

    def epoch_(self) -> None:
        self.loader.set_epoch(self.epoch)
        self.model.train()
        for x, y, _ in self.loader:
            x_adv = self.ta(x, y) if self.ta is not None else self.pgd(x, y)
            loss = F.cross_entropy(self.model(x_adv), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
        self.epoch += 1


class ART:
    def __init__(self, trainer: Trainer) -> None:
        from art.defences.trainer import AdversarialTrainerMadryPGD
        from art.estimators.classification import PyTorchClassifier

        t = trainer.config.train
        model = copy.deepcopy(trainer.raw_model)
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), optimizer=opt,
                                input_shape=trainer.data.input_shape, nb_classes=trainer.data.num_classes,
                                clip_values=(0.0, 1.0), device_type="cpu")
        eps = trainer.eps_full
        self.trainer = AdversarialTrainerMadryPGD(clf, nb_epochs=1, batch_size=t.batch_size, eps=eps,
                                                  eps_step=2.5 * eps / 10, max_iter=10)
        self.x = trainer.data.train.floats().numpy()
        self.y = trainer.data.train.y.numpy()

    def epoch_(self) -> None:
        self.trainer.fit(self.x, self.y, nb_epochs=1)


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux ``VmHWM``), in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def contenders_for(args, trainer: Trainer) -> dict:
    out = {"regdefense pgd_at": lambda: regdefense_epoch(trainer),
           "hand-written loop": HandWritten(trainer).epoch_,
           "plain loop + torchattacks PGD": HandWritten(trainer, use_torchattacks=True).epoch_}
    if not args.no_art:
        out["ART AdversarialTrainerMadryPGD"] = ART(trainer).epoch_
    return out


def peak_memory(args, names: list[str]) -> dict[str, str]:
    """Run each contender for one epoch in a fresh process; its peak RSS there."""
    import subprocess
    import sys

    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--peak", name, "--model", args.model, "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out[name] = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else "failed"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default="digits_cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-art", action="store_true", help="skip ART (its import takes a few seconds)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    ap.add_argument("--peak", metavar="NAME", help=argparse.SUPPRESS)  # internal: one contender, one epoch
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = make_trainer(args)
    n = len(trainer.data.train)
    if args.peak:
        args.no_art = "ART" not in args.peak
        run = contenders_for(args, trainer)[args.peak]
        before = peak_rss_mib()
        run()
        print(f"{peak_rss_mib():.0f} MiB (+{peak_rss_mib() - before:.0f})")
        return
    contenders = contenders_for(args, trainer)
    for run in contenders.values():  # warm-up round, not timed
        run()
    times = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    def paired(name: str, ref: str) -> float:
        """Median over rounds of the speed ratio within each round (rounds drift; a round's contenders ran together)."""
        return statistics.median(r / t for r, t in zip(times[ref], times[name]))

    art_name = "ART AdversarialTrainerMadryPGD"
    memory = {} if args.no_memory else peak_memory(args, list(contenders))
    print(f"PGD-10 AT, {trainer.data.name} ({n} training images), {args.model}, batch {args.batch_size}, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'contender':32s} {'images/s':>9s} {'spread':>11s} {'vs hand-written':>15s} {'vs ART':>7s} "
          f"{'peak RSS (epoch growth)':>24s}")
    for name, ts in times.items():
        ips = [n / t for t in ts]
        med = statistics.median(ips)
        vs_art = f"{paired(name, art_name):.2f}x" if art_name in times else "-"
        print(f"{name:32s} {med:9.0f} {min(ips):5.0f}-{max(ips):<5.0f} {paired(name, 'hand-written loop'):14.2f}x "
              f"{vs_art:>7s} {memory.get(name, '-'):>24s}")


if __name__ == "__main__":
    main()
