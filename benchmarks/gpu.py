"""PGD-10 adversarial training on a GPU: fp32, bf16, bf16 + channels_last, + torch.compile.

CIFAR-sized synthetic data (3×32×32, 10 classes) on the CIFAR ResNet-18 (``resnet18``), batch 256, through the real
regdefense loop (``pgd_at``, 10 steps). For each setting: images/s, peak GPU memory, and the fraction
of the chip's measured bf16 matmul peak the training achieves (the step's FLOPs are counted exactly
with ``torch.utils.flop_counter`` on one eager step, not estimated).

    python benchmarks/gpu.py                       # all four settings
    python benchmarks/gpu.py --modes fp32,bf16     # a subset
    python benchmarks/gpu.py --device cpu --batch-size 8 --steps 2 --modes fp32   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import time

import torch

from regdefense.data.sources import Data, Split
from regdefense.host.discovery import activate
from regdefense.training.loop import Trainer
from regdefense.training.run import load_config

MODES = {  # name: (train.amp, train.channels_last, train.compile)
    "fp32": ("off", False, False),
    "bf16": ("bf16", False, False),
    "bf16+channels_last": ("bf16", True, False),
    "bf16+channels_last+compile": ("bf16", True, True),
}


def synthetic(n: int, seed: int = 0, size: int = 32, classes: int = 10) -> Data:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Data(name="synthetic", train=Split(x, y), val=None, test=Split(x[:16], y[:16]), num_classes=classes,
                default_eps=8 / 255)


def make_trainer(args, mode: str, steps: int) -> Trainer:
    amp, channels_last, compile_ = MODES[mode]
    cfg = load_config(defenses=["pgd_at"], overrides=[
        f"model.name={args.model}", f"train.batch_size={args.batch_size}", "train.epochs=1000",
        "train.progress=false", f"train.device={args.device}", f"train.amp={amp}",
        f"train.channels_last={str(channels_last).lower()}", f"train.compile={str(compile_).lower()}",
        f"pgd_at.steps={args.pgd_steps}", "train.schedule=constant", "train.lr=0.01"])
    data = synthetic(args.batch_size * steps, size=args.size, classes=args.classes)
    return Trainer(cfg, pm=activate(cfg.defenses, cfg.defense), data=data)


def run_epochs(trainer: Trainer, epochs: int) -> None:
    trainer.config.train.epochs = trainer.state.epoch + epochs
    trainer.fit()


def step_flops(args) -> float:
    """FLOPs of one PGD-K training step (K + 1 forwards, K input-gradient backwards, 1 full backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer = make_trainer(args, "fp32", 1)
    with FlopCounterMode(display=False) as counter:
        run_epochs(trainer, 1)
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured dense bf16 matmul throughput in FLOP/s (the chip's practical peak)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda":
        n, reps = 1024, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--size", type=int, default=32, help="image side (224 for ImageNet-sized inputs)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--pgd-steps", type=int, default=10, help="attack steps per training step")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; pass --device cpu for a smoke run")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if device.type == "cuda" and any(MODES[m][0] == "bf16" for m in modes) and not torch.cuda.is_bf16_supported():
        raise SystemExit("this GPU has no bf16; run --modes fp32")
    flops = step_flops(args)
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"PGD-{args.pgd_steps} AT, {args.model}, synthetic 3x{args.size}x{args.size}, {args.classes} classes, "
          f"batch {args.batch_size}, {name}, torch {torch.__version__}")
    print(f"one step = {flops / 1e12:.3f} TFLOP; measured matmul peak {peak / 1e12:.1f} TFLOP/s "
          f"({'bf16' if device.type == 'cuda' else 'fp32'} {8192 if device.type == 'cuda' else 1024}^3)")
    print(f"{'setting':28s} {'images/s':>10s} {'vs fp32':>8s} {'peak mem':>10s} {'of matmul peak':>15s}")
    base = None
    for mode in modes:
        trainer = make_trainer(args, mode, args.steps)
        run_epochs(trainer, 1)  # warm-up: cuDNN autotuning, compilation
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        run_epochs(trainer, args.epochs)
        sync(device)
        seconds = time.perf_counter() - start
        ips = args.batch_size * args.steps * args.epochs / seconds
        base = base or (ips if mode == "fp32" else None)
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
        util = flops * args.steps * args.epochs / seconds / peak
        ratio = f"{ips / base:.2f}x" if base else "-"
        print(f"{mode:28s} {ips:10.3g} {ratio:>8s} {mem:>10s} {util:14.1%}")  # 3 digits: a slow CPU shows 0.8, not 0
        del trainer


if __name__ == "__main__":
    main()
