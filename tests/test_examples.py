"""The examples run as shipped (with fewer epochs)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_defense_example_stacks_a_term_on_pgd_at():
    out = subprocess.run([sys.executable, str(EXAMPLES / "custom_defense.py"), "--epochs", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("epoch  1") and "weight_l2" in line and "PGD-20" in line


def test_art_pipeline_example_runs():
    out = subprocess.run([sys.executable, str(EXAMPLES / "art_pipeline.py"), "--epochs", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ART PGD-20" in out.stdout.strip().splitlines()[-1]
