"""SHA-256 of the trained weights of the default run and three stacked recipes, with a fixed seed.

    python benchmarks/weights_digest.py [--epochs N] [--out DIR]

A refactoring that claims "behaviour unchanged" prints the same digests before and after (run it on both trees).
The digest covers every tensor of the final model, of the extra networks and of each defense's saved state.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch

from regdefense.base import checkpoint
from regdefense.training.run import train

RUNS = {  # label -> (recipe file or None for the default run, its defenses)
    "default (pgd_at)": None,
    "fgsm_pgk + ema": "recipes/digits/fgsm_pgk_ema.toml",
    "dynat + trades + awp": "recipes/digits/dynat_awp.toml",
    "lbgat + awp": "recipes/digits/lbgat_awp.toml",
}


def digest(obj) -> str:
    h = hashlib.sha256()

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            h.update(prefix.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{prefix}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    walk("", obj)
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6, help="epochs per recipe (the default run keeps its own 30)")
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="digest-"))
    print(f"{'run':<24} {'model':<18} {'modules':<18} {'defenses':<18}")
    for k, (label, recipe) in enumerate(RUNS.items()):
        overrides = ["train.progress=false"] + ([f"train.epochs={args.epochs}"] if recipe else [])
        res = train(recipe, overrides=overrides, out=root / str(k), echo=lambda _m: None)
        p = checkpoint.load(res.run_dir / "checkpoints" / "last.pt")
        print(f"{label:<24} {digest(p['model']):<18} {digest(p['modules']):<18} {digest(p['plugins']):<18}")


if __name__ == "__main__":
    main()
