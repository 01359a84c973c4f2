"""regdefense sweep: every recipe × seed runs into its own folder, failures are listed not dropped, a rerun keeps
what finished, and --print gives the commands for a cluster."""

import json
import shlex

from click.testing import CliRunner

from regdefense.cli import cli

RECIPE = """defenses = ["pgd_at"]
[train]
epochs = 1
progress = false
device = "cpu"
[data]
limit = 120
[eval]
val_samples = 16
pgd_steps = 1
test_samples = 40
"""


def test_sweep_runs_every_recipe_and_seed_and_lists_failures(tmp_path):
    good = tmp_path / "recipes" / "pgd_at.toml"
    good.parent.mkdir()
    good.write_text(RECIPE)
    bad = tmp_path / "recipes" / "broken.toml"
    bad.write_text(RECIPE.replace("limit = 120", f'limit = 120\nname = "{tmp_path / "no-such-data"}"'))
    out = tmp_path / "sweep"
    args = ["sweep", str(good), str(bad), "--seeds", "0", "1", "--out", str(out)]

    printed = CliRunner().invoke(cli, [*args, "--print", "--attacks", "quick", "--n", "8"])
    lines = printed.output.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("regdefense train --config") for line in lines)
    first = shlex.split(lines[0])
    assert first[first.index("--seed") + 1] == "0" and first[first.index("--out") + 1] == str(out / "recipes-pgd_at" / "seed0")
    assert "&& regdefense evaluate" in lines[0] and not out.exists()  # printing runs nothing

    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    groups = {g["recipe"]: g for g in data["groups"]}
    assert groups["recipes-pgd_at"]["runs"] == 2 and groups["recipes-pgd_at"]["failed"] == 0
    assert groups["recipes-pgd_at"]["seeds"] == [0, 1]
    assert groups["recipes-broken"]["runs"] == 2 and groups["recipes-broken"]["failed"] == 2
    assert all("no-such-data" in r["status"] for r in data["runs"] if r["recipe"] == "recipes-broken")
    for seed in (0, 1):
        cfg = json.loads((out / "recipes-pgd_at" / f"seed{seed}" / "config.json").read_text())
        assert cfg["train"]["seed"] == seed
    stamp = (out / "recipes-pgd_at" / "seed0" / "summary.json").stat().st_mtime_ns

    again = CliRunner().invoke(cli, [*args[:2], "--seeds", "0", "--out", str(out)])
    assert "finished before, kept" in again.output and "| recipes-pgd_at | 1 | 0 |" in again.output
    assert (out / "recipes-pgd_at" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
