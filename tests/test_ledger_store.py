"""The best-known ledger as a store: concurrent writers lose nothing, a corrupt copy is moved aside, an unwritable one
is a one-line :class:`LedgerError`, and the architecture is part of the key."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from regdefense.base.errors import UserError
from regdefense.evaluation import ledger

SHA = "ab" * 32
REPO = Path(__file__).resolve().parent.parent


def _meta(**kw):
    return {"weights_sha256": SHA, "dataset": "digits", "norm": "linf", "eps": 0.1} | kw


def _broken(n: int, *idx: int) -> torch.Tensor:
    still = torch.ones(n, dtype=torch.bool)
    still[list(idx)] = False
    return still


# what each writer process runs: ``count`` records of one new attack label each, into the weights' ledger and its own
# report copy (as two ``evaluate --out A`` / ``--out B`` of the same weights do); the module is loaded from a path so
# that an older ledger.py can be put through the same test by hand
_WRITER = textwrap.dedent(
    """
    import importlib.util, sys, time
    from pathlib import Path
    import torch
    module, tag, cache, copy, go, count, n = sys.argv[1:8]
    spec = importlib.util.spec_from_file_location("ledger_under_test", module)
    ledger = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ledger)
    n, meta = int(n), {"weights_sha256": "ab" * 32, "dataset": "digits", "norm": "linf", "eps": 0.1}
    while not Path(go).exists():
        time.sleep(0.005)
    for k in range(int(count)):
        still = torch.ones(n, dtype=torch.bool)
        still[k % (n - 4)] = False  # the last 4 points are never broken
        ledger.record([Path(cache), Path(copy)], meta, torch.ones(n, dtype=torch.bool), {f"{tag}-{k}": still})
    """
)


def concurrent_writers(folder: Path, module: str | Path = ledger.__file__, count: int = 200, n: int = 24) -> dict:
    """Run two writer processes at once; return their exit codes, stderr and the ledgers they leave."""
    cache, go = folder / "ledgers" / f"{SHA}.json", folder / "go"
    copies = {tag: folder / f"out-{tag}" / "ledger.json" for tag in ("a", "b")}
    for copy in copies.values():
        copy.parent.mkdir(parents=True)
    procs = {
        tag: subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(module), tag, str(cache), str(copy), str(go), str(count), str(n)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag, copy in copies.items()
    }
    go.touch()
    done = {tag: p.communicate(timeout=600) for tag, p in procs.items()}
    read = lambda p: json.loads(p.read_text()) if p.is_file() else None  # noqa: E731
    return {
        "rc": {tag: p.returncode for tag, p in procs.items()},
        "stderr": {tag: err for tag, (_, err) in done.items()},
        "cache": read(cache),
        "copies": {tag: read(copy) for tag, copy in copies.items()},
    }


def test_two_processes_recording_at_once_lose_no_attack(tmp_path):
    count, n = 200, 24
    got = concurrent_writers(tmp_path, count=count, n=n)
    assert got["rc"] == {"a": 0, "b": 0}, got["stderr"]
    (entry,) = got["cache"]["entries"].values()
    labels = {f"{tag}-{k}" for tag in "ab" for k in range(count)}
    assert set(entry["attacks"]) == labels and len(entry["attacks"]) == 2 * count
    for i in range(n):  # each point is named by an attack that broke it; the never-broken ones stay robust
        breakers = {f"{tag}-{k}" for tag in "ab" for k in range(count) if k % (n - 4) == i}
        by = entry["points"][str(i)]["broken_by"]
        assert (by in breakers) if breakers else by is None, (i, by)
    for tag, copy in got["copies"].items():  # each report's copy holds at least everything its own run recorded
        (mine,) = copy["entries"].values()
        assert {f"{tag}-{k}" for k in range(count)} <= set(mine["attacks"])
    assert not list(tmp_path.rglob("*.tmp"))


CORRUPT = {
    "garbage": lambda p: p.write_bytes(b"\x00{not json"),
    "a list": lambda p: p.write_text("[1]"),
    "entries not a dict": lambda p: p.write_text('{"entries": 3}'),
    "a bad entry": lambda p: p.write_text('{"entries": {"k": {"attacks": [], "points": {"0": 5}}}}'),
    "a directory": lambda p: (p.mkdir(), (p / "inside").write_text("x")),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_ledger_is_moved_aside_with_a_note_and_the_evaluation_still_recorded(tmp_path, kind):
    path, copy = tmp_path / "ledgers" / f"{SHA}.json", tmp_path / "out" / "ledger.json"
    path.parent.mkdir()
    CORRUPT[kind](path)
    copy.parent.mkdir()
    ledger.record([copy], _meta(), torch.ones(4, dtype=torch.bool), {"old (x)": _broken(4, 3)})  # a sound copy
    notes: list[str] = []
    entry = ledger.record(
        [path, copy], _meta(), torch.tensor([True, False, True, True]), {"new (x)": _broken(4, 2)}, notes=notes
    )
    (aside,) = path.parent.glob(f"{SHA}.json.corrupt-*")
    assert len(notes) == 1 and str(path) in notes[0] and aside.name in notes[0] and "\n" not in notes[0]
    assert aside.is_dir() == (kind == "a directory")
    assert [p["broken_by"] for p in entry["points"].values()] == [None, "clean", "new (x)", "old (x)"]
    for p in (path, copy):
        assert json.loads(p.read_text())["entries"] == {ledger._key(_meta()): entry}


def test_a_corrupt_ledger_warns_when_no_notes_are_asked_for(tmp_path):
    path = tmp_path / "l.json"
    path.write_text("[1]")
    with pytest.warns(UserWarning, match="moved aside"):
        ledger.record(path, _meta(), torch.ones(2, dtype=torch.bool), {"a": _broken(2, 0)})
    assert json.loads(path.read_text())["format"] == ledger.FORMAT


def test_an_unwritable_ledger_is_a_one_line_ledger_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("REGDEFENSE_LEDGER", str(blocker / "sub"))  # root writes through chmod; not under a file
    path = ledger.weights_ledger(SHA)
    with pytest.raises(ledger.LedgerError) as err:
        ledger.record([path, tmp_path / "ledger.json"], _meta(), torch.ones(2, dtype=torch.bool), {})
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert str(path) in msg and "REGDEFENSE_LEDGER=" in msg and "Not a directory" in msg


def test_an_immutable_ledger_is_a_ledger_error(tmp_path):
    path = tmp_path / "l.json"
    ledger.record(path, _meta(), torch.ones(2, dtype=torch.bool), {"a": _broken(2, 0)})
    before = path.read_text()
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(ledger.LedgerError, match=r"could not write the best-known ledger .*l\.json: "):
            ledger.record(path, _meta(), torch.ones(2, dtype=torch.bool), {"b": _broken(2, 1)})
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert path.read_text() == before and not list(tmp_path.glob("*.tmp"))


def test_a_ledger_locked_too_long_is_a_ledger_error_naming_it(tmp_path):
    path = tmp_path / "l.json"
    with open(tmp_path / "l.json.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's evaluation, as far as record can tell
        with pytest.raises(ledger.LedgerError, match=r"l\.json stayed locked .* for 0\.2 s"):
            ledger.record(path, _meta(), torch.ones(2, dtype=torch.bool), {}, timeout=0.2)
    assert not path.exists()


def test_a_copy_named_twice_or_through_a_link_does_not_wait_for_itself(tmp_path):
    path = tmp_path / "l.json"
    (tmp_path / "link.json").symlink_to(path)
    entry = ledger.record(
        [path, path, tmp_path / "link.json"], _meta(), torch.ones(2, dtype=torch.bool), {"a": _broken(2, 1)}, timeout=2
    )
    assert entry["attacks"] == ["a"]


def test_a_ledger_of_a_newer_format_is_refused_untouched(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps({"format": ledger.FORMAT + 1, "entries": {}}))
    with pytest.raises(ledger.LedgerError, match="newer"):
        ledger.record(path, _meta(), torch.ones(2, dtype=torch.bool), {})
    assert json.loads(path.read_text())["format"] == ledger.FORMAT + 1


def test_the_architecture_is_part_of_the_key(tmp_path):
    path = tmp_path / "l.json"
    a = ledger.record(path, _meta(model="A"), torch.ones(3, dtype=torch.bool), {"pgd (A)": _broken(3, 0, 1)})
    b = ledger.record(path, _meta(model="B"), torch.ones(3, dtype=torch.bool), {"fgsm (B)": _broken(3, 2)})
    assert a["attacks"] == ["pgd (A)"] and b["attacks"] == ["fgsm (B)"]
    assert ledger.headline(b) == (pytest.approx(2 / 3), 3)  # B's best known does not see A's attack
    entries = json.loads(path.read_text())["entries"]
    assert set(entries) == {ledger._key(_meta(model="A")), ledger._key(_meta(model="B"))}
    assert ledger._key(_meta(model="A")).endswith("|arch=A") and ledger._key(_meta()).endswith("eps=0.1")


def test_an_entry_written_before_the_architecture_was_keyed_is_taken_over(tmp_path):
    path = tmp_path / "l.json"
    old = {"attacks": ["old (quick)"], "points": {"0": {"broken_by": "old (quick)"}, "1": {"broken_by": None}}}
    path.write_text(json.dumps({"format": 1, "entries": {ledger._key(_meta()): old}}))
    entry = ledger.record(path, _meta(model="A"), torch.ones(2, dtype=torch.bool), {"new (x)": _broken(2, 1)})
    assert entry["attacks"] == ["old (quick)", "new (x)"]
    assert [p["broken_by"] for p in entry["points"].values()] == ["old (quick)", "new (x)"]
    data = json.loads(path.read_text())
    assert data["format"] == ledger.FORMAT and list(data["entries"]) == [ledger._key(_meta(model="A"))]
    fresh = ledger.record(path, _meta(model="B"), torch.ones(2, dtype=torch.bool), {})
    assert fresh["attacks"] == [] and ledger.headline(fresh) == (1.0, 2)
