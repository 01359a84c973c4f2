"""Checkpoints load with weights_only=True: corrupt or foreign files give a clear error, never run code."""

import pickle

import pytest
import torch

from regdefense.base import checkpoint
from regdefense.base.errors import CheckpointError


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
    with pytest.raises(CheckpointError, match="fails its checksum: the file is truncated or corrupt"):
        checkpoint.load(cut)
    plain_cut = tmp_path / "plain-cut.pt"  # a torch.save file without our header, cut short
    torch.save({"format": 1, "model": {"w": torch.ones(1000)}}, plain_cut)
    plain_cut.write_bytes(plain_cut.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        checkpoint.load(plain_cut)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a regdefense checkpoint"):
        checkpoint.load(foreign)


def test_a_single_flipped_byte_fails_the_checksum(tmp_path):
    path = checkpoint.save({"format": checkpoint.FORMAT, "model": {"w": torch.arange(5000.0)}}, tmp_path / "c.pt")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the tensor data: torch alone would load a silently wrong weight
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        checkpoint.load(path)


def test_code_in_a_checksummed_file_is_still_never_executed(tmp_path):
    """Anyone can compute a checksum: it guards against corruption, not against a hostile file."""
    import hashlib
    import io
    import os

    buf = io.BytesIO()
    torch.save({"format": 1, "model": _Evil()}, buf, pickle_module=pickle)
    body = buf.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(body).digest() + body)
    if os.path.exists("/tmp/regdefense-pwned"):
        os.remove("/tmp/regdefense-pwned")
    with pytest.raises(CheckpointError, match="never unpickled"):
        checkpoint.load(path)
    assert not os.path.exists("/tmp/regdefense-pwned")


def test_a_full_disk_during_a_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    import os

    path = checkpoint.save({"format": checkpoint.FORMAT, "model": {"w": torch.ones(3)}}, tmp_path / "last.pt")
    real_fsync = os.fsync

    def full_disk(fd):  # the write itself "succeeded" into the page cache; the flush to disk fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CheckpointError, match="the disk is full; the previous last.pt is intact"):
        checkpoint.save({"format": checkpoint.FORMAT, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert not list(tmp_path.glob(".*.tmp"))


_WRITER = """
import sys, torch
from regdefense.base import checkpoint
path, n = sys.argv[1], 0
while True:
    n += 1
    checkpoint.save({"format": 1, "model": {"w": torch.full((2_000_000,), float(n))}, "n": n}, path)
    print(n, flush=True)
"""


def test_a_process_killed_while_writing_never_leaves_a_truncated_latest_checkpoint(tmp_path):
    """SIGKILL a process that rewrites last.pt in a loop, at several moments: what is there always loads."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "last.pt"
    seen = set()
    for delay in (0.05, 0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one complete checkpoint exists
        time.sleep(delay)  # 8 MB per write: the kill lands mid-write most of the time
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        payload = checkpoint.load(path)
        w = payload["model"]["w"]
        assert w.shape == (2_000_000,) and bool((w == payload["n"]).all())
        seen.add(payload["n"])
    assert max(seen) > 1  # the kills came while an existing checkpoint was being replaced, not before the first
