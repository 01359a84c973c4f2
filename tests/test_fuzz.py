"""Config and CLI input fuzzed with hypothesis: the answer is a run plan (exit 0) or one clear line (exit 2).

Runs the real click CLI in-process with ``train --check``, which does everything a run does before its
first step (config, data checks, model, stack) and writes nothing.
"""

import dataclasses

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regdefense.base.config import DataConfig, EvalConfig, ModelConfig, ThreatConfig, TrainConfig
from regdefense.cli import cli

# keys that reach the network or the whole file system are fuzzed in test_cli.py with chosen values instead
OFF_LIMITS = {"data.name", "data.download", "data.data_dir", "model.pretrained", "train.init", "train.out_dir"}
SECTIONS = {"train": TrainConfig, "data": DataConfig, "model": ModelConfig, "threat": ThreatConfig, "eval": EvalConfig}
KEYS = sorted(f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if f"{s}.{f.name}" not in OFF_LIMITS)
KEYS += ["pgd_at.steps", "pgd_at.eps", "pgd_at.alpha", "pgd_at.attack", "pgd_at.norm", "trades.beta",
         "awp.gamma", "train.nope", "nosection.key", "pgd_at", "", "."]

VALUES = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "none", "8/255", "1/0", "[]", "[0.5, 2]", "{}", "{'a': 1}", "nan", "-inf",
                     "9**9**9", "10**400", "1e309", "__import__('os').system('true')", "cuda:7", "meta", "cpu",
                     "torchattacks:PGD(eps=0.1)", "torchattacks:PGD(eps=", "art:Nope()", "bf16", "fp16", "'",
                     '"', "\\", "\x00", "x" * 300, "-1", "0", "0.0", "1e-300", "2**63"]),
    st.text(max_size=20),
)
OVERRIDE = st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}")
DEFENSES = st.lists(st.sampled_from(["pgd_at", "trades", "awp", "mart", "fast_at", "none", "pgd_att", "", "core",
                                     "gairat", "mail", "dynat", "ema"]), max_size=3)


def _check(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["train", "--check", "--quiet", *args], catch_exceptions=True)
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crashed, f"{args!r} raised {result.exception!r}"
    assert result.exit_code in (0, 2), (args, result.exit_code, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    if result.exit_code == 2:  # one "Error: ..." line (click's usage errors echo the argument as typed)
        assert any(ln.startswith("Error: ") for ln in result.output.split("\n")), (args, result.output)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=4), defenses=DEFENSES)
def test_fuzzed_overrides_and_stacks_give_a_plan_or_one_clear_error(overrides, defenses):
    args = [a for o in overrides for a in ("-o", o)] + [a for d in defenses for a in ("--defense", d)]
    _check(args + ["-o", "train.device=cpu"] if "train.device" not in " ".join(overrides) else args)


TOML_LINE = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0].split('.')[-1]} = {kv[1]}"),
    st.sampled_from(["[train]", "[data]", "[model]", "[defense.pgd_at]", "[defense.nope]", "defenses = ['trades']",
                     "defenses = 'pgd_at'", "defenses = [1, 2]", "[[train]]", "= 3", "[train", "epochs = ",
                     "data = 5"]),
    st.text(max_size=30),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lines=st.lists(TOML_LINE, max_size=6))
def test_fuzzed_run_files_give_a_plan_or_one_clear_error(tmp_path, lines):
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    _check(["--config", str(path), "-o", "train.device=cpu"])


@settings(max_examples=40, deadline=None)
@given(args=st.lists(st.one_of(st.sampled_from(["--epochs", "--seed", "--model", "--device", "--defense", "-o",
                                                "--config", "--resume", "--json", "--bogus"]), st.text(max_size=12)),
                     max_size=5))
def test_fuzzed_command_lines_never_show_a_traceback(args):
    if "--resume" in args or "--config" in args:
        return  # paths: covered above and in test_cli.py
    _check(args)


SPEC = st.one_of(
    st.text(max_size=40),
    st.builds(lambda lib, name, args: f"{lib}:{name}({args})",
              st.sampled_from(["torchattacks", "art", "ta", "", "os"]),
              st.sampled_from(["PGD", "FGSM", "APGD", "ProjectedGradientDescent", "Square", "__class__", "PGD.__init__",
                               "system", "PDG"]),
              st.one_of(st.text(max_size=25), st.sampled_from([
                  "eps=8/255, steps=10", "eps=__import__('os').system('true')", "eps=1e999", "steps=-1",
                  "steps=10**10", "eps=0.1, eps=0.2", "**{}", "*[1]", "lambda: 0", "eps=(1,2)", "norm='Linf'"]))),
)


@settings(max_examples=150, deadline=None)
@given(spec=SPEC)
def test_fuzzed_attack_specs_resolve_or_give_a_user_error(spec):
    """Attack specs come from users' command lines and run files: parsed, never executed."""
    from regdefense.attacks.adapter import resolve_attack
    from regdefense.base.errors import UserError

    try:
        attack = resolve_attack(spec)
    except UserError as exc:
        assert str(exc).strip()  # a message that says what was wrong (the CLI prints it on one line)
        return
    assert callable(attack)
