"""Beyond one process: sharded evaluation (torchrun ranks, ``--shard K/N`` + ``merge``), submitit sweeps, and a
two-node training rendezvous on localhost. Every comparison is against the one-process result, per point."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from regdefense.cli import cli
from regdefense.evaluation.runner import evaluate, evaluate_model
from regdefense.evaluation.targets import load_target

WORKERS = Path(__file__).parent / "workers"
#: 16 points in batches of 4: two ranks (or shards) take two whole batches each. At ε = 0.3 the PGD-AT digits model
#: keeps a few points through APGD-CE, so AutoAttack's next stage runs on a subset that one rank holds alone.
N, BATCH, EPS = 16, 4, 0.3
SUITES = ["quick", "autoattack"]


def _launch(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    head = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        "0",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
    ]
    return subprocess.run(head + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def weights(digits_models, tmp_path_factory):
    """The PGD-AT digits model as a user's state_dict file (``--arch digits_cnn``)."""
    path = tmp_path_factory.mktemp("scale") / "pgd_at.pt"
    torch.save(digits_models["pgd_at"].state_dict(), path)
    return path


@pytest.fixture(scope="module")
def one_process(weights):
    """The reference: the same points evaluated in this one process, one thread (as each torchrun worker runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = load_target(weights, arch="digits_cnn", n=N, device="cpu")
    torch.manual_seed(0)
    rep = evaluate_model(
        t.model,
        t.x,
        t.y,
        suites=SUITES,
        eps=EPS,
        default_eps=t.default_eps,
        norm=t.norm,
        num_classes=t.num_classes,
        seed=0,
        batch_size=BATCH,
        check_samples=8,
        progress=False,
    )
    torch.set_num_threads(threads)
    return rep


def _same_points(ref, rows: dict, checks: dict, clean) -> None:
    assert torch.equal(ref.clean_points, clean)
    for r in ref.rows:
        assert torch.equal(r.points, rows[f"{r.suite}|{r.label}"]), (r.suite, r.label)
    assert ref.check_points and set(ref.check_points) == set(checks)
    for name, ok in ref.check_points.items():
        assert torch.equal(ok, checks[name]), name


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process_and_a_killed_rank_resumes(one_process, weights, tmp_path):
    """``torchrun --nproc-per-node 2`` (gloo): rank 1 dies (SIGKILL) as its second attack starts; the rerun resumes
    from both ranks' progress files and rank 0's report equals one process per point (quick, AutoAttack's cascade,
    the checks' attacks)."""
    cascade = [r for r in one_process.rows if r.kind == "cascade step"]
    assert cascade[0].robust > 0  # APGD-CE leaves points for APGD-T: a later stage runs on a subset
    worker = [str(WORKERS / "eval_worker.py"), str(weights), "out", "dump.pt", ",".join(SUITES), str(N), str(BATCH)]
    killed = _launch([*worker, "die"], tmp_path)
    assert killed.returncode != 0 and not (tmp_path / "dump.pt").exists()
    assert sorted(p.name for p in (tmp_path / "out").glob("progress*.pt")) == ["progress.rank0.pt", "progress.rank1.pt"]
    again = _launch(worker, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "rank 0 wrote the report" in again.stdout
    assert "rank 1 wrote" not in again.stdout  # one report, from rank 0
    got = torch.load(tmp_path / "dump.pt")
    assert got["n"] == N
    _same_points(one_process, got["rows"], got["checks"], got["clean"])
    assert not list((tmp_path / "out").glob("progress*.pt"))  # every rank's progress removed once the report is written
    entries = json.loads((tmp_path / "out" / "ledger.json").read_text())["entries"]
    assert len(entries) == 1 and len(next(iter(entries.values()))["points"]) == N  # one entry, from rank 0


def test_shards_merged_equal_one_process_and_bad_merges_are_refused(one_process, weights, digits_models, tmp_path):
    """``--shard 1/2`` and ``--shard 2/2`` as separate jobs, then ``regdefense merge``: per point as one process for
    the attacks that run on every point and the checks (shard 1 holds the check points)."""
    kw = {
        "arch": "digits_cnn",
        "n": N,
        "batch_size": BATCH,
        "eps": EPS,
        "suites": ["quick"],
        "check_samples": 8,
        "surrogate": None,
        "progress": False,
        "device": "cpu",
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    parts = [evaluate(weights, out=tmp_path / f"s{k}", shard=f"{k}/2", **kw)[1]["partial"].parent for k in (1, 2)]
    odd_eps = evaluate(weights, out=tmp_path / "eps", shard="2/2", **kw | {"eps": 0.25})[1]["partial"].parent
    other = tmp_path / "clean.pt"
    torch.save(digits_models["clean"].state_dict(), other)
    odd_weights = evaluate(other, out=tmp_path / "w", shard="2/2", **kw | {"checks": False})[1]["partial"].parent
    torch.set_num_threads(threads)
    assert not list(parts[0].glob("progress*.pt")) and not (parts[0] / "report.json").exists()

    run = CliRunner().invoke(cli, ["merge", str(parts[1]), str(parts[0]), "--out", str(tmp_path / "merged"), "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["meta"]["shards"] == 2
    report = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert report["meta"]["n"] == N
    entries = json.loads((tmp_path / "merged" / "ledger.json").read_text())["entries"]
    assert len(entries) == 1 and len(next(iter(entries.values()))["points"]) == N
    quick = {f"{r.suite}|{r.label}": r for r in one_process.rows if r.suite == "quick"}
    for row in report["rows"]:
        if row["suite"] == "quick":
            assert row["robust"] == quick[f"quick|{row['label']}"].robust, row["label"]
    from regdefense.evaluation.shards import combine

    merged = combine([parts[0], parts[1]])
    for name, r in quick.items():
        assert torch.equal(next(m.points for m in merged.rows if f"{m.suite}|{m.label}" == name), r.points), name
    assert torch.equal(merged.clean_points, one_process.clean_points)
    for name, ok in one_process.check_points.items():
        assert torch.equal(merged.check_points[name], ok), name

    def refused(*folders) -> str:
        r = CliRunner().invoke(cli, ["merge", *map(str, folders), "--out", str(tmp_path / "bad")])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
        return r.output

    assert "different ε" in refused(parts[0], odd_eps)
    assert "different weights" in refused(parts[0], odd_weights)
    assert "shard 2/2 missing" in refused(parts[0])
    assert "given twice" in refused(parts[0], parts[1], parts[1])
    for field, value, name in (
        ("seed", 1, "seed"),
        ("suites", ["paper-001"], "suites"),
        ("points", ["digits", None, 99], "point set"),
        ("labels", "0" * 16, "labels"),  # the same dataset name, another copy's labels
    ):
        payload = torch.load(parts[1] / "partial.pt")
        payload["key"][field] = value
        forged = tmp_path / f"forged-{field}"
        forged.mkdir()
        torch.save(payload, forged / "partial.pt")
        assert f"different {name}" in refused(parts[0], forged)
    assert not (tmp_path / "bad").exists()


def test_a_shard_is_a_whole_number_of_batches_and_bad_shards_are_refused():
    from regdefense.base.errors import UserError
    from regdefense.evaluation.shards import parse_shard, split_batches

    assert split_batches(16, 4, 2) == [(0, 8), (8, 16)]
    assert split_batches(10, 4, 3) == [(0, 4), (4, 8), (8, 10)]
    assert split_batches(3, 4, 2) == [(0, 0), (0, 3)]  # fewer batches than shards: an empty shard, not a split batch
    blocks = split_batches(1003, 10, 4)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1003
    assert all(a % 10 == 0 and b == c for (a, b), (c, _) in zip(blocks, blocks[1:]))
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/2", "3/2", "two", "1/2/3"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


# --- sweeps through submitit ------------------------------------------------------------------

RECIPE = """defenses = {defenses}
[train]
epochs = {epochs}
progress = false
device = "cpu"
[data]
limit = 120
[eval]
val_samples = 16
pgd_steps = 1
test_samples = 32
[slurm]
time_min = 10
"""


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
def test_a_submitit_sweep_runs_each_run_as_a_job_requeues_a_preempted_one_and_compare_reads_all(tmp_path):
    """Submitit's local executor (real processes, no Slurm): 2 recipes × 2 seeds, four jobs; the first job is
    pre-empted (submitit's USR2, as Slurm sends it) after its first checkpoint, requeued, and resumes from last.pt;
    `compare` and `sweep --status` read all four runs. Marked slow (deselected by default): four processes."""
    from regdefense.sweeps import cluster, sweep

    recipe = tmp_path / "r" / "pgd_at.toml"
    recipe.parent.mkdir()
    recipe.write_text(RECIPE.format(defenses='["pgd_at"]', epochs=3))
    clean = tmp_path / "r" / "clean.toml"
    clean.write_text(RECIPE.format(defenses="[]", epochs=2))
    out = tmp_path / "sweep"
    jobs = sweep.plan([str(recipe), str(clean)], [0, 1], out)
    assert cluster.Resources.of(str(recipe), {"gpus": 2}).parameters() == {
        "timeout_min": 10,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": 2,
    }
    submitted = cluster.submit(jobs, folder=out / ".submitit", given={}, cluster="local", echo=lambda m: None)
    victim_job, victim = submitted[0]
    last = victim_job.out / "checkpoints" / "last.pt"
    for _ in range(6000):  # the first epoch's checkpoint, then pre-empt the job mid-run
        if last.exists() or victim.done():
            break
        time.sleep(0.05)
    assert last.exists() and not (victim_job.out / "summary.json").exists(), "the job finished before the pre-emption"
    task = _children(int(victim.job_id))  # the job's process under submitit's local controller: what Slurm signals
    assert len(task) == 1
    os.kill(task[0], signal.SIGUSR2)  # submitit's pre-emption / time-out signal
    rows = cluster.collect(submitted, echo=lambda m: None)
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    log = victim.stdout() + (victim.stderr() or "")
    assert "Requeued job" in log and "resuming" in log, log[-2000:]
    epochs = [json.loads(line).get("epoch") for line in (victim_job.out / "metrics.jsonl").read_text().splitlines()]
    assert len(set(e for e in epochs if e is not None)) == 3  # every epoch, the ones before the pre-emption kept

    compared = CliRunner().invoke(cli, ["compare", *[str(j.out) for j in jobs], "--json"])
    assert compared.exit_code == 0, compared.output
    runs = json.loads(compared.output)["runs"]
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs)
    status = CliRunner().invoke(
        cli, ["sweep", str(recipe), str(clean), "--seeds", "0", "1", "--out", str(out), "--status", "--json"]
    )
    assert status.exit_code == 0 and len(json.loads(status.output)["runs"]) == 4


# --- training on two nodes ---------------------------------------------------------------------


def _digest(run: Path) -> str:
    from regdefense.base import checkpoint

    h = hashlib.sha256()
    for name, t in sorted(checkpoint.load(run / "checkpoints" / "last.pt")["model"].items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_two_nodes_on_localhost_train_the_weights_of_one_node_with_two_processes(tmp_path):
    """``torchrun --nnodes 2`` with the c10d rendezvous, one process per "node", both on localhost: the same
    weights, bit for bit, as ``torchrun --nproc-per-node 2`` on one node."""
    train = [
        "-m",
        "regdefense",
        "train",
        "--quiet",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "-o",
        "data.limit=256",
        "-o",
        "eval.val_samples=16",
        "-o",
        "eval.test_samples=16",
        "-o",
        "eval.pgd_steps=1",
    ]
    one = _launch([*train, "--out", "one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"localhost:{port}",
        "--rdzv-id",
        "two-nodes",
        *train,
        "--out",
        "two",
    ]
    nodes = [
        subprocess.Popen(node, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [err[-2000:] for _, err in outputs]
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


def test_the_shard_key_digests_every_evaluated_label_and_nothing_else():
    """Shards of one evaluation share the digest whatever their span; another copy's labels (same dataset name, same
    count) or another count changes it; the images do not enter it (each shard decodes only its own)."""
    from types import SimpleNamespace

    from regdefense.data.sources import Split
    from regdefense.evaluation.runner import _labels_digest

    y = torch.arange(20) % 10
    x = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
    target = SimpleNamespace(split=Split(x, y), y=y[:4], count=20)
    same = _labels_digest(target)
    assert _labels_digest(SimpleNamespace(split=Split(x + 1, y.clone()), y=y[8:12], count=20)) == same
    other = y.clone()
    other[17] = (other[17] + 1) % 10
    assert _labels_digest(SimpleNamespace(split=Split(x, other), y=y[:4], count=20)) != same
    assert _labels_digest(SimpleNamespace(split=Split(x, y), y=y[:4], count=19)) != same
    assert _labels_digest(SimpleNamespace(split=None, y=y, count=20)) == same  # a model file's points: its labels
