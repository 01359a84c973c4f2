"""Checkpoints load with weights_only=True: corrupt or foreign files give a clear error, never run code."""

import pickle

import pytest
import torch

from regdefense import checkpoint
from regdefense.errors import CheckpointError


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/regdefense-pwned",))


def test_atomic_save_and_load_round_trip(tmp_path):
    path = checkpoint.save({"format": checkpoint.FORMAT, "model": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))


def test_code_in_a_checkpoint_is_never_executed(tmp_path):
    import os

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": _Evil()}, path, pickle_module=pickle)
    if os.path.exists("/tmp/regdefense-pwned"):
        os.remove("/tmp/regdefense-pwned")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(path)
    assert not os.path.exists("/tmp/regdefense-pwned")


def test_truncated_missing_and_foreign_files(tmp_path):
    good = checkpoint.save({"format": checkpoint.FORMAT, "model": {"w": torch.ones(1000)}}, tmp_path / "g.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        checkpoint.load(cut)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a regdefense checkpoint"):
        checkpoint.load(foreign)
