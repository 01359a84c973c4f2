import os
import sys
from pathlib import Path

import pytest
import torch

pytest_plugins = ["regdefense.testing"]

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """Create a throwaway installed distribution (a package plus its .dist-info with entry points)
    in a fresh folder on sys.path, visible through importlib.metadata like a pip-installed one."""

    def make(dist: str, modules: dict[str, str], entry_points: dict[str, str], version: str = "1.0") -> Path:
        site = tmp_path / f"site-{dist}"
        site.mkdir()
        for name, source in modules.items():
            (site / f"{name}.py").write_text(source)
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[regdefense]\n{eps}\n")
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
        return site

    yield make
    for name in [m for m in sys.modules if m.startswith("thirdparty_")]:
        del sys.modules[name]
