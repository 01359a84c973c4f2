"""The streamed loader against what training consumes, and the memory of both data paths.

    python benchmarks/loader.py                 # speed table (generated 224-px JPEGs) + peak RSS, 2 k vs 20 k images
    python benchmarks/loader.py speed --n 512   # only the speed table
    python benchmarks/loader.py memory          # only the peak-RSS table
    python benchmarks/loader.py rss --root DIR --stream on|off   # one peak-RSS measurement (JSON), used by the tests

Speed: images/s the streamed loader delivers (decode + ImageNet augmentation, 1 and 2 worker processes) on generated
224-px JPEGs, next to the images/s one PGD-2 adversarial-training step of ResNet-50 consumes on the same machine
(torchvision's ResNet-50 through the real loop, batch 8). The loader must deliver at least 3x what a step consumes
per worker-core.

Memory: the peak resident set of one process that loads a generated folder and iterates one epoch, streamed
(``data.stream=on``, files decoded in the process, workers 0 so the number is this process's) and in memory
(``data.stream=off``), for 2 000 and 20 000 images of 32 px. Streamed, it must not grow with the data; in memory it
does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_folder(root: Path, n: int, side: int, classes: int = 10, fmt: str = "jpg", seed: int = 0) -> Path:
    """``root/train/c*/`` with ``n`` random images (and a 2-image test split)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    for split, count in (("train", n), ("test", 2 * classes)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = np.roll(base, (i * 7) % side, axis=0)  # cheap to make, different per image
            Image.fromarray(img).save(root / split / f"c{i % classes}" / f"{i:06d}.{fmt}", quality=90)
    return root


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it is not inherited across fork + exec)."""
    from regdefense.training.run import peak_host_bytes

    return peak_host_bytes() / 2 ** 20


def rss(root: str, stream: str) -> dict:
    """Peak RSS (MiB) of loading ``root`` and iterating one training epoch, in this process."""
    from regdefense.base.config import DataConfig
    from regdefense.data.sources import BatchLoader, Split, load_data
    from regdefense.data.stream import StreamLoader

    before = peak_rss_mib()
    data = load_data(DataConfig(name=root, stream=stream, val_fraction=0))
    if isinstance(data.train, Split):
        loader = BatchLoader(data.train, 256, seed=0)
    else:
        loader = StreamLoader(data.train, 256, seed=0, workers=0)
    seen = sum(len(y) for _, y, _ in loader)
    return {"images": seen, "peak_rss_mib": peak_rss_mib(),
            "rss_before_mib": before, "streamed": not isinstance(data.train, Split)}


def rss_subprocess(root: Path, stream: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "rss", "--root", str(root), "--stream", stream],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loader_speed(root: Path, workers: int, seconds: float = 8.0) -> float:
    from regdefense.base.config import DataConfig
    from regdefense.data.sources import load_data
    from regdefense.data.stream import StreamLoader

    data = load_data(DataConfig(name=str(root), stream="on", image_size=224, val_fraction=0, augment="imagenet"))
    loader = StreamLoader(data.train, 32, seed=0, augment="imagenet", workers=workers)
    n, start, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        loader.set_epoch(epoch)
        for _, y, _ in loader:
            n += len(y)
        epoch += 1
    return n / (time.perf_counter() - start)


def step_speed(batch: int = 8, steps: int = 3) -> float:
    """Images/s a PGD-2 training step of ResNet-50 at 224 px consumes here (after one warm-up step)."""
    from regdefense import hookimpl
    from regdefense.data.sources import Data, Split
    from regdefense.host.discovery import activate
    from regdefense.training.loop import Trainer
    from regdefense.training.run import load_config

    x = torch.randint(0, 256, (batch * (steps + 1), 3, 224, 224), dtype=torch.uint8)
    y = torch.randint(0, 1000, (len(x),))
    data = Data(name="synthetic", train=Split(x, y), val=None, test=Split(x[:8], y[:8]), num_classes=1000,
                default_eps=4 / 255)
    cfg = load_config(defenses=["pgd_at"], overrides=["model.name=resnet50", f"train.batch_size={batch}",
                                                      "train.epochs=1", "train.progress=false", "train.device=cpu",
                                                      "pgd_at.steps=2", "train.schedule=constant"])
    times = []

    class Clock:
        name = "clock"

        @hookimpl
        def regdefense_batch_end(self, trainer, step):
            times.append(time.perf_counter())

    Trainer(cfg, pm=activate(["pgd_at", Clock()], cfg.defense), data=data).fit()
    return batch * (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "speed", "memory", "rss"])
    ap.add_argument("--n", type=int, default=512, help="224-px JPEGs for the speed table")
    ap.add_argument("--root")
    ap.add_argument("--stream", default="on")
    args = ap.parse_args()
    if args.what == "rss":
        print(json.dumps(rss(args.root, args.stream)))
        return
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.what in ("all", "speed"):
            root = make_folder(tmp / "big", args.n, 256)  # resized and cropped to 224 by the pipeline
            consume = step_speed()
            print(f"PGD-2 AT step, ResNet-50, 224 px, batch 8, {torch.get_num_threads()} threads: {consume:.2f} images/s")
            print(f"{'workers':>8s} {'images/s':>10s} {'per worker':>11s} {'x step':>8s}")
            for w in (1, 2):
                speed = loader_speed(root, w)
                print(f"{w:8d} {speed:10.1f} {speed / w:11.1f} {speed / w / consume:8.1f}")
        if args.what in ("all", "memory"):
            print(f"\n{'images':>8s} {'path':>10s} {'peak RSS MiB':>13s}")
            for n in (2000, 20000):
                root = make_folder(tmp / f"rss{n}", n, 32, fmt="png")
                for stream in ("on", "off"):
                    r = rss_subprocess(root, stream)
                    print(f"{n:8d} {'streamed' if r['streamed'] else 'in memory':>10s} {r['peak_rss_mib']:13.1f}")


if __name__ == "__main__":
    main()
