"""``regdefense new-plugin NAME``: write a third-party defense package that installs and passes its own test.

The package is the smallest complete plugin: a pyproject with the ``regdefense`` entry point, one module with a
validated ``Config``, one hook (a loss-term wrapper, the most common kind of defense) and its data-contract
declaration, a test that uses ``regdefense.testing`` and checks the term against its formula, and a README.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from regdefense._version import __version__
from regdefense.base.errors import UserError
from regdefense.host.discovery import catalogue

PYPROJECT = """[build-system]
requires = ["hatchling>=1.18"]
build-backend = "hatchling.build"

[project]
name = "regdefense-{dash}"
version = "0.1.0"
description = "{title}: a regdefense defense plugin"
requires-python = ">=3.10"
dependencies = ["regdefense>={core}"]

[project.optional-dependencies]
test = ["pytest>=7.4"]

# the door regdefense discovers defenses through: the entry-point name is what users activate
[project.entry-points.regdefense]
{name} = "regdefense_{name}:{cls}"

[tool.hatch.build.targets.wheel]
packages = ["regdefense_{name}"]
"""

MODULE = '''"""{title}: adds w·mean(z²), a penalty on the squared logits of the adversarial batch, to whatever objective
is active. Replace the term with your defense's; keep the wrapper shape so it stacks on any base (pgd_at, trades...).
"""

from __future__ import annotations

from dataclasses import dataclass

from regdefense import hookimpl, option
from regdefense.host.contract import Key
from regdefense.host.defense import Defense


class {cls}(Defense):
    """{title}: a logit penalty on the adversarial batch."""

    name = "{name}"  # must equal the entry-point name in pyproject.toml
    requires = ("make_adversarial",)  # the term needs adversarial inputs: refuse a stack without an adversary
    reads = (Key("outputs.adv", "compute_loss", silent=True),)  # reuse the objective's logits when it published them

    @dataclass
    class Config:
        weight: float = option(0.01, "w: weight of the logit penalty", ge=0)

    @hookimpl(wrapper=True)
    def regdefense_compute_loss(self, trainer, step, model):
        terms = yield  # the active objective's terms
        logits = step.outputs.get("adv") if model is trainer.model else None
        if logits is None:
            logits = model(step.adv_inputs)
        terms["{name}"] = self.config.weight * logits.float().pow(2).mean()
        return terms
'''

CONFTEST = """pytest_plugins = ["regdefense.testing"]
"""

TEST = """import torch

from regdefense.host.step import Step


def test_the_term_is_added_and_follows_its_formula(tiny_trainer):
    trainer = tiny_trainer(["pgd_at", "{name}"], ["{name}.weight=0.5", "pgd_at.steps=2"])
    x, y, idx = next(iter(trainer.train_loader))
    step = Step.from_batch((x, y, idx), trainer.device)
    step.adv_inputs = trainer.hook.regdefense_make_adversarial(trainer=trainer, step=step, model=trainer.model)
    terms = trainer.loss_terms(step, trainer.model)
    expected = 0.5 * trainer.model(step.adv_inputs).pow(2).mean()
    assert torch.allclose(terms["{name}"], expected, rtol=1e-5)
    assert "task" in terms  # the base objective's term is still there


def test_it_trains_and_logs_its_term(tiny_trainer):
    trainer = tiny_trainer(["pgd_at", "{name}"], ["pgd_at.steps=2"])
    history = trainer.fit()
    assert history[-1]["loss_{name}"] > 0
"""

README = """# regdefense-{dash}

{title}, a defense plugin for [regdefense](https://pypi.org/project/regdefense/).

```bash
pip install -e ".[test]" && python -m pytest        # install it and run its test
regdefense plugins                                   # {name} is listed, with its status
regdefense train --defense pgd_at --defense {name} -o {name}.weight=0.01
```

`regdefense_{name}/__init__.py` holds the defense: a `Config` (every field with a default, help and limits), one
hook, and its declarations (`requires`, `reads`). See regdefense's docs/writing-plugins.md and docs/hooks.md.
"""


def new_plugin(name: str, where: str | Path = ".") -> Path:
    """Write ``regdefense-NAME/`` under ``where`` (NAME with dashes for underscores, as pip writes distribution names:
    ``input_grad_reg`` → ``regdefense-input-grad-reg/``) and return its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise UserError(f"plugin name '{name}' must be a lower-case Python identifier, e.g. logit_penalty")
    if name in catalogue():
        raise UserError(f"a defense named '{name}' is already installed; choose another name")
    root = Path(where) / f"regdefense-{name.replace('_', '-')}"
    if root.exists():
        raise UserError(f"{root} already exists; remove it or choose another name")
    cls = "".join(part.capitalize() for part in name.split("_"))
    title = name.replace("_", " ").capitalize()
    values = {"name": name, "dash": name.replace("_", "-"), "cls": cls, "title": title, "core": __version__}
    files = {
        "pyproject.toml": PYPROJECT,
        f"regdefense_{name}/__init__.py": MODULE,
        "tests/conftest.py": CONFTEST,
        f"tests/test_{name}.py": TEST,
        "README.md": README,
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(**values))
    return root
