"""``regdefense new-plugin``: the package it writes installs (pip, as a user would) and passes its own test."""

import os
import subprocess
import sys

import pytest

from regdefense.base.errors import UserError
from regdefense.host.template import new_plugin


def test_the_generated_plugin_installs_lists_and_passes_its_test(tmp_path):
    out = subprocess.run([sys.executable, "-m", "regdefense", "new-plugin", "logit_pairing", "--dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    root = tmp_path / "regdefense-logit-pairing"
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(root)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "regdefense", "plugins"], capture_output=True, text=True, env=env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("logit_pairing"))
    assert "regdefense-logit-pairing 0.1.0" in row and " ok " in row
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], capture_output=True,
                           text=True, env=env, cwd=root)
    assert tests.returncode == 0 and "2 passed" in tests.stdout, tests.stdout[-3000:]


def test_bad_names_and_existing_folders_are_refused(tmp_path):
    with pytest.raises(UserError, match="lower-case Python identifier"):
        new_plugin("Logit-Pairing", tmp_path)
    with pytest.raises(UserError, match="already installed"):
        new_plugin("pgd_at", tmp_path)
    new_plugin("once", tmp_path)
    with pytest.raises(UserError, match="already exists"):
        new_plugin("once", tmp_path)


def test_every_file_the_generated_readme_names_exists(tmp_path):
    import re

    root = new_plugin("input_grad_reg", tmp_path)
    assert root.name == "regdefense-input-grad-reg"  # as docs/cli.md says: dashes for underscores
    named = re.findall(r"`([\w./-]+\.(?:py|toml|md))`", (root / "README.md").read_text())
    assert "regdefense_input_grad_reg/__init__.py" in named
    assert all((root / n).exists() for n in named if "/" in n or n.startswith("regdefense_")), named
