"""The package's shape (docs/architecture.md): layers that import only downward, no import circle, evaluation apart
from training, and checks and suites open to third parties through entry points."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LINT = str(Path(sys.executable).parent / "lint-imports")  # import-linter's command, installed by the test extra

#: imports of regdefense modules that may sit inside a function, and why (each is downward and counted by the checks)
DEFERRED = {
    "regdefense.cli": "every command imports what it runs, so `regdefense --help` does not load torch",
    "regdefense.evaluation.surrogate": "the training loop, only when a clean surrogate must be trained",
    "regdefense.attacks.adapter": "attacks.fixes subclasses torchattacks' attacks and is imported with torchattacks",
}


def circles(package: str) -> list[tuple[str, str]]:
    """Pairs (a, b): a imports b directly and b leads back to a (function-level imports count; TYPE_CHECKING
    blocks do not)."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=True, cache_dir=None)
    return sorted((a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                  if b != a and graph.chain_exists(importer=b, imported=a))


def test_the_package_has_no_import_circle():
    assert circles("regdefense") == []


def test_the_circle_check_sees_a_circle_hidden_inside_a_function(tmp_path, monkeypatch):
    pkg = tmp_path / "circular_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from circular_pkg import high\n    return high\n")
    (pkg / "high.py").write_text("from circular_pkg import low\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert circles("circular_pkg") == [("circular_pkg.high", "circular_pkg.low"), ("circular_pkg.low", "circular_pkg.high")]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_layers_contract_holds():
    """import-linter's contracts from pyproject.toml: the subpackages layered, and each subpackage's modules."""
    done = subprocess.run([LINT, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(_contracts())} kept, 0 broken" in done.stdout


def test_one_layer_is_one_subpackage_and_each_subpackage_is_layered():
    """The tree shows the layers: the top contract names subpackages (and the few edge modules), and every
    subpackage with more than one module has its own exhaustive layers contract naming each of its modules."""
    contracts = {c["id"]: c for c in _contracts()}
    top = [name.strip() for layer in contracts["layers"]["layers"] for name in layer.split(":")]
    packages = sorted(p.name for p in (ROOT / "regdefense").iterdir() if (p / "__init__.py").exists())
    flat = sorted(p.stem for p in (ROOT / "regdefense").glob("*.py") if p.stem != "__init__")
    assert sorted(top) == sorted(packages + flat)
    assert len(flat) <= 7, f"the package's top level is for the edge only, found {flat}"
    for pkg in packages:
        modules = sorted(p.stem for p in (ROOT / "regdefense" / pkg).glob("*.py") if p.stem != "__init__")
        inner = [c for c in contracts.values() if c.get("containers") == [f"regdefense.{pkg}"]]
        assert len(inner) == 1 and inner[0]["exhaustive"], f"regdefense.{pkg} has no exhaustive layers contract"
        named = sorted(n.strip() for layer in inner[0]["layers"] for n in layer.split(":"))
        assert named == modules, pkg


def _statements(fn: ast.AST) -> int:
    return sum(isinstance(node, ast.stmt) for node in ast.walk(fn)) - 1


@pytest.mark.parametrize("module", ["training/loop.py", "evaluation/suite_runner.py"])
def test_no_function_of_the_loop_or_the_suite_runner_is_over_50_statements(module):
    tree = ast.parse((ROOT / "regdefense" / module).read_text())
    sizes = {fn.name: _statements(fn) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)}
    assert sizes and max(sizes.values()) <= 50, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    # the count is honest: the old evaluate_model, as one function, was twice the limit
    old = subprocess.run(["git", "show", "27591e1:regdefense/evaluate.py"], cwd=ROOT, capture_output=True, text=True)
    if old.returncode == 0 and module.startswith("evaluation"):
        fns = {fn.name: fn for fn in ast.walk(ast.parse(old.stdout)) if isinstance(fn, ast.FunctionDef)}
        assert _statements(fns["evaluate_model"]) > 50


def test_old_module_names_import_with_a_deprecation_warning_and_the_same_objects():
    """Every moved module still imports under its old name (docs/changelog.md), warns once, and hands out the new
    module's own objects, so a plugin's ``isinstance`` and subclassing keep working."""
    from regdefense._moved import MOVED

    changelog = (ROOT / "docs" / "changelog.md").read_text()
    for old, new in MOVED.items():
        assert f"`regdefense.{old}`" in changelog and f"`regdefense.{new}`" in changelog, old
    code = textwrap.dedent("""
        import importlib, json, warnings
        from regdefense._moved import MOVED
        out = {}
        for old, new in MOVED.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                shim = importlib.import_module("regdefense." + old)
            real = importlib.import_module("regdefense." + new)
            public = [k for k in vars(real) if not k.startswith("_")]
            same = all(getattr(shim, k) is getattr(real, k) for k in public)
            out[old] = [same, [str(w.message) for w in caught if w.category is DeprecationWarning]]
        from regdefense.defense import Defense
        from regdefense.host.defense import Defense as New
        out["defense-class"] = Defense is New
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("defense-class") is True
    for old, (same, warned) in out.items():
        assert same, old
        assert len(warned) == 1 and f"regdefense.{MOVED[old]}" in warned[0], (old, warned)


def test_the_layers_contract_catches_an_upward_import(tmp_path):
    """The same contract, run on a copy of the package with one upward import added (foundation -> loop), breaks."""
    copy = tmp_path / "regdefense"
    shutil.copytree(ROOT / "regdefense", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "evaluation" / "metrics.py", "a") as fh:
        fh.write("\n\ndef _upward():\n    from regdefense.training import loop\n    return loop\n")
    done = subprocess.run([LINT, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp_path,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert done.returncode != 0
    assert "regdefense.evaluation.metrics -> regdefense.training.loop" in done.stdout


def test_imports_inside_functions_are_only_the_declared_ones():
    """A regdefense import inside a function is allowed only where DEFERRED says why (optional heavy packages such
    as timm or wandb are not regdefense imports)."""
    found = []
    for path in sorted((ROOT / "regdefense").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("regdefense")):
                    found.append((module, node.module))
                elif isinstance(node, ast.Import) and any(a.name.startswith("regdefense") for a in node.names):
                    found.append((module, node.names[0].name))
    assert [f for f in found if f[0] not in DEFERRED] == []


def test_evaluating_a_run_imports_no_training_code(tmp_path):
    from regdefense.testing import TINY
    from regdefense.training.run import train

    run = train(defenses=["pgd_at"], overrides=TINY + ["train.epochs=1"], out=tmp_path / "run",
                echo=lambda _m: None).run_dir
    code = textwrap.dedent(f"""
        import json, sys
        from regdefense.evaluation.runner import evaluate
        from regdefense.training.restore import load_model
        report, _ = evaluate({str(run)!r}, suites=["torchattacks:FGSM(eps=0.1)"], n=16, checks=False, progress=False,
                             out={str(tmp_path / 'eval')!r})
        model = load_model({str(run)!r})
        loop = sorted(m for m in sys.modules if m in ("regdefense.training.loop", "regdefense.training.run", "regdefense.training.services",
                                                      "regdefense.training.extra"))
        print(json.dumps({{"loop": loop, "clean": report.clean, "training": model.training}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loop"] == []
    assert 0.0 <= out["clean"] <= 1.0 and out["training"] is False


THIRD_PARTY_CHECK = '''
from regdefense.evaluation.checks import result

def always_flags(ctx):
    acc = ctx.ok("noise probe", "torchattacks:GN(std=0.3)")
    return result("paper check: noise probe", acc >= 2.0, f"noise probe {acc:.1%} on {len(ctx.y)} points", acc=acc)
'''

THIRD_PARTY_SUITE = '''
from regdefense.evaluation.suites import Suite, SuiteAttack

def tiny_fgsm(request):
    return Suite("paper-fgsm", [SuiteAttack("FGSM/2", f"torchattacks:FGSM(eps={request.eps / 2!r})")],
                 protocol="FGSM at half the budget", eps=request.eps, norm=request.norm)
'''


def test_a_third_party_check_and_suite_appear_in_evaluate(tmp_path, make_dist):
    from click.testing import CliRunner

    from regdefense.cli import cli
    from regdefense.testing import TINY
    from regdefense.training.run import train

    make_dist("regdefense-paper-check", {"thirdparty_check": THIRD_PARTY_CHECK},
              {"noise-probe": "thirdparty_check:always_flags"}, group="regdefense.checks")
    make_dist("regdefense-paper-suite", {"thirdparty_suite": THIRD_PARTY_SUITE},
              {"paper-fgsm": "thirdparty_suite:tiny_fgsm"}, group="regdefense.suites")
    run = train(defenses=["pgd_at"], overrides=TINY, out=tmp_path / "run", echo=lambda _m: None).run_dir
    res = CliRunner().invoke(cli, ["evaluate", str(run), "--attacks", "paper-fgsm", "--n", "24", "--surrogate", "none",
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "eval" / "report.json").read_text())
    assert [r["label"] for r in report["rows"] if r["kind"] == "attack"] == ["FGSM/2"]
    assert "FGSM(eps=0.1)" in report["rows"][0]["spec"]  # half of the digits' ε 0.2: the suite was built with it
    mine = [c for c in report["checks"] if c["name"] == "paper check: noise probe"]
    assert mine and mine[0]["status"] == "warn"  # it can never pass (acc >= 2): its verdict reached the report
    headline = [c for c in report["checks"] if c["name"] == "headline vs the checks' attacks"]
    assert headline, "the headline check still runs last"
    assert report["checks"][-1]["name"] == "headline vs the checks' attacks"
    assert "paper check: noise probe" in res.output


def test_a_check_that_raises_is_reported_not_applicable(digits_models, monkeypatch):
    import regdefense.evaluation.checks as checks
    from regdefense.evaluation.runner import evaluate_model

    def broken(ctx):
        raise RuntimeError("this model has no purifier")

    monkeypatch.setitem(checks.CHECKS._builtin, "broken", checks.RegisteredCheck("broken", broken, 15))
    data = digits_models["data"]
    x, y = data.test.floats(list(range(24))), data.test.y[:24]
    rep = evaluate_model(digits_models["clean"], x, y, suites=["quick"], eps=0.2, progress=False)
    row = next(c for c in rep.checks if c["name"] == "broken")
    assert row["status"] == "skip" and "not applicable: RuntimeError: this model has no purifier" in row["message"]
    assert len(rep.checks) == len(checks.registry())  # every other check still ran
