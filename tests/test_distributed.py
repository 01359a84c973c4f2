"""Data-parallel training with 2 CPU processes (gloo), launched by torchrun as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regdefense.base import distributed

WORKER = Path(__file__).parent / "workers" / "ddp_worker.py"


def _run(args: list[str], nproc: int | None, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"] if nproc else [sys.executable]
    return subprocess.run(launcher + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def _worker(mode: str, nproc: int | None, tmp_path: Path) -> dict:
    out = tmp_path / f"{mode.replace('/', '_')}-{nproc}.json"
    proc = _run([str(WORKER), mode, str(out)], nproc, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_take_the_same_steps_as_one_on_the_same_global_batch(tmp_path):
    """Clean training has no randomness but the data order: 2 processes must match 1 to float rounding."""
    one, two = _worker("clean", None, tmp_path), _worker("clean", 2, tmp_path)
    for name, w in one["weights"].items():
        assert torch.allclose(torch.tensor(w), torch.tensor(two["weights"][name]), atol=1e-5), name
    assert abs(one["history"][-1]["loss"] - two["history"][-1]["loss"]) < 1e-5
    assert one["history"][-1]["val_clean"] == pytest.approx(two["history"][-1]["val_clean"], abs=1e-9)


def test_per_sample_buffers_and_extra_optimizers_stay_identical_across_processes(tmp_path):
    r = _worker("buffers", 2, tmp_path)
    assert r["prior_equal_on_all_ranks"] and r["weights_equal_on_all_ranks"]
    assert r["prior_rows_written"] > 200  # rows written on either process reached both
    assert r["mean"] == {"one": 1.0, "rank": 0.5}  # trainer.dist.mean: a plugin's scalars averaged over processes


@pytest.mark.parametrize("stack, guide", [("lbgat", "lbgat_guide"), ("dynat", "dynat_guide"), ("atop", "atop_purifier")])
def test_a_guide_network_added_by_a_defense_is_trained_in_step_on_every_process(tmp_path, stack, guide):
    r = _worker(f"stack:{stack}", 2, tmp_path)
    assert r["networks"] == sorted([guide, "model"]) and all(r["equal_on_all_ranks"].values())


def test_two_processes_stream_an_image_folder_each_index_once_per_epoch(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 4)):  # 80 training images: 5 global batches of 16, 8 per process
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    r = _worker(f"stream:{root}", 2, tmp_path)
    assert r["n"] == 80 and set(r["epochs"]) == {"0", "1"}
    for seen in r["epochs"].values():  # gathered from both processes: every index exactly once
        assert sorted(seen) == list(range(80))
    assert r["epochs"]["0"] != r["epochs"]["1"]  # reshuffled per epoch
    assert r["weights_equal_on_all_ranks"]


def test_drifting_weights_are_caught_at_the_epoch_end(tmp_path):
    r = _worker("drift", 2, tmp_path)
    assert r["error"] is not None and "drifted apart" in r["error"] and "model" in r["error"]


@pytest.mark.slow  # minutes of CPU: deselected by default, `python -m pytest -m slow` runs it
def test_a_two_process_cli_run_on_the_default_data_matches_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m regdefense train`` vs ``regdefense train``: the default PGD-AT run."""
    args = ["-m", "regdefense", "train", "--quiet", "--json", "--epochs", "15"]
    one = _run(args + ["--out", str(tmp_path / "one")], None, tmp_path)
    two = _run(args + ["--out", str(tmp_path / "two")], 2, tmp_path)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a = json.loads(one.stdout)["table"][0]
    b = json.loads(two.stdout)["table"][0]  # rank 0 alone reports
    print(f"1 process: {a}\n2 processes: {b}")
    assert a["clean"] > 0.9 and b["clean"] > 0.9
    assert abs(a["clean"] - b["clean"]) < 0.04 and abs(a["robust"] - b["robust"]) < 0.08
    assert not (tmp_path / "two-1").exists() and len(list((tmp_path / "two").glob("metrics.jsonl"))) == 1


def test_one_process_is_not_distributed():
    d = distributed.init()
    assert not d.enabled and d.is_main and d.world == 1
    idx = torch.arange(10)
    assert torch.equal(d.shard(idx), idx)
    buf = torch.zeros(10)
    d.set_rows(buf, torch.tensor([2, 5]), torch.tensor([1.0, 2.0]))
    assert buf[2] == 1 and buf[5] == 2


@pytest.mark.slow  # minutes of CPU: deselected by default, `python -m pytest -m slow` runs it
def test_the_gpu_benchmark_runs_its_smoke_setting_on_the_cpu(tmp_path):
    """benchmarks/gpu.py must not rot while no GPU is lent: its fp32 row on a tiny CPU setting."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--device", "cpu", "--batch-size", "4",
                           "--steps", "1", "--epochs", "1", "--modes", "fp32"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [ln for ln in proc.stdout.splitlines() if ln.startswith("fp32")][0].split()
    assert float(row[1]) > 0 and row[2] == "1.00x"
    assert "TFLOP" in proc.stdout
