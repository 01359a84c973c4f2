"""The ``regdefense`` command line (click)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from regdefense._version import __version__
from regdefense.base.config import SEED_MAX
from regdefense.base.errors import UserError
from regdefense.data.registry import DATASETS


class _UserFacing(click.ClickException):
    """A UserError shown as one line, exit status 2."""

    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            err = _UserFacing(" ".join(str(exc).split("\n")).replace("\r", " "))  # one line, whatever the input held
            err.exit_code = exc.exit_code  # type: ignore[misc]  # 2 for bad input, 130 for a run stopped by a signal
            if (
                int(os.environ.get("WORLD_SIZE", "1")) > 1
            ):  # under torchrun: say it once per process and leave without teardown
                err.show()
                sys.stderr.flush()
                os._exit(err.exit_code)
            raise err from None
        except KeyboardInterrupt as exc:  # a signal (safety.Interrupted says what was kept), or a bare Ctrl-C: 130
            stopped = _UserFacing(" ".join(str(exc).split()) or "interrupted")
            stopped.exit_code = getattr(exc, "exit_code", 130)  # type: ignore[misc]
            raise stopped from None


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from regdefense.host.discovery import catalogue

    click.echo(f"regdefense {__version__}")
    dists = sorted({(i.dist, i.version) for i in catalogue().values()})
    for dist, version in dists:
        click.echo(f"  {dist} {version}")
    ctx.exit()


# --- options several commands share, declared once --------------------------------------------------------------


def json_option(help: str = "Machine-readable output."):
    """``--json``: the command's result as JSON on stdout."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def quiet_option(help: str = "No progress bars."):
    return click.option("--quiet", is_flag=True, help=help)


def out_option(help: str, **kw):
    """``--out FOLDER``: where the command writes."""
    return click.option("--out", type=click.Path(file_okay=False), help=help, **kw)


def checkpoint_option(fn):
    """``--checkpoint best|last``: which checkpoint of a run directory."""
    return click.option(
        "--checkpoint",
        "which",
        type=click.Choice(["best", "last"]),
        default="best",
        show_default=True,
        help="Which checkpoint of a run directory.",
    )(fn)


def seed_option(help: str, **kw):
    return click.option("--seed", type=click.IntRange(0, SEED_MAX), help=help, **kw)


def device_option(help: str = "auto, cpu, cuda, cuda:N.", **kw):
    return click.option("--device", help=help, **kw)


def n_option(dest: str, help: str):
    """``--n N``: only the first N test points."""
    return click.option("--n", dest, type=click.IntRange(min=1), help=help)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version of regdefense and of every defense distribution.",
)
def cli() -> None:
    """Train image classifiers that resist adversarial examples, with stackable defenses."""


def _table(rows: list[dict], columns: list[tuple[str, str]], pct: tuple[str, ...] = ()) -> str:
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k), k in pct) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    """The first line of ``text``, cut to ``width`` characters (tables stay readable; the details are elsewhere)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _fmt(v, pct: bool = False) -> str:
    if isinstance(v, float):
        return f"{100 * v:.2f}%" if pct else f"{v:.4g}"
    return "" if v is None else str(v)


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML run file.")
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    metavar="NAME",
    help="Activate a defense (repeat to stack, in order); 'none' trains without one.",
)
@click.option(
    "-o",
    "--override",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Set a config value, e.g. -o train.epochs=5 -o pgd_at.steps=7.",
)
@click.option(
    "--dataset",
    help=f"Dataset name ({', '.join(sorted(DATASETS.builtin()))}, or one a package registers: regdefense "
    "datasets) or a folder (shortcut for -o data.name=...).",
)
@click.option("--model", help="Architecture (shortcut for -o model.name=...).")
@click.option("--epochs", type=int, help="Shortcut for -o train.epochs=...")
@click.option("--data-dir", help="Where torchvision datasets live (-o data.data_dir=...).")
@click.option("--download", is_flag=True, default=None, help="Download a missing torchvision dataset.")
@click.option(
    "--pretrained",
    is_flag=True,
    default=None,
    help="Start torchvision or timm (timm:NAME) architectures from ImageNet weights; offline, give a timm "
    "model a local file with -o model.weights=FILE.",
)
@device_option("auto, cpu, cuda, cuda:N (-o train.device=...).")
@seed_option("Random seed (-o train.seed=...).")
@out_option("Run directory (default: a new one under runs/).")
@click.option("--resume", type=click.Path(), help="Continue the run in RUN_DIR (or from a checkpoint file).")
@click.option(
    "--init",
    "init",
    type=click.Path(),
    help="Start from the weights of RUN_DIR (its best.pt) or a "
    "checkpoint, e.g. a clean-trained model (-o train.init=...).",
)
@click.option(
    "--log",
    "log",
    multiple=True,
    metavar="NAME",
    help="Log to an experiment tracker: tensorboard, wandb, mlflow or an installed tracker plugin "
    "(repeatable; -o train.log=[...]).",
)
@json_option("Print the final table as JSON.")
@quiet_option()
@click.option(
    "--check",
    is_flag=True,
    help="Resolve the config, load the data, build the model and the stack, say "
    "what would run, and stop: nothing is trained or written.",
)
def train(
    config_file,
    defenses,
    overrides,
    dataset,
    model,
    epochs,
    data_dir,
    download,
    pretrained,
    device,
    seed,
    out,
    resume,
    init,
    log,
    as_json,
    quiet,
    check,
) -> None:
    """Train a defense stack; with no arguments, PGD-AT on the embedded digits."""
    from regdefense.base import distributed
    from regdefense.training.run import train as run_train

    overrides = list(overrides)
    for key, value in (
        ("data.name", dataset),
        ("model.name", model),
        ("train.epochs", epochs),
        ("data.data_dir", data_dir),
        ("data.download", download),
        ("model.pretrained", pretrained),
        ("train.device", device),
        ("train.seed", seed),
        ("train.init", init),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    if log:
        overrides.append("train.log=" + json.dumps(list(log)))
    if quiet:
        overrides.append("train.progress=false")
    stack = None
    if defenses:
        stack = [] if list(defenses) == ["none"] else list(defenses)
    echo = (lambda s: click.echo(s, err=True)) if as_json else click.echo
    if check:
        from regdefense.training.run import check as run_check
        from regdefense.training.run import check_out

        summary = run_check(config_file, stack, overrides)
        click.echo(summary + ("\n" + check_out(out) if out is not None else ""))
        return
    result = run_train(config_file, defenses=stack, overrides=overrides, out=out, resume=resume, echo=echo)
    if not result.main:
        distributed.finish()  # torchrun: rank 0 reports
    if as_json:
        click.echo(
            json.dumps(
                {"run_dir": str(result.run_dir), "table": result.table, "wall_seconds": result.wall_seconds}, indent=2
            )
        )
        distributed.finish()
        return
    last = result.history[-1] if result.history else {}
    click.echo("")
    click.echo(
        _table(
            result.table,
            [
                ("model", "model"),
                ("clean", "clean acc"),
                ("robust", "robust acc"),
                ("attack", "attack"),
                ("n", "test samples"),
            ],
            pct=("clean", "robust"),
        )
    )
    if last:
        click.echo(
            f"\nfinal epoch: held-out clean {_fmt(last.get('val_clean'), True)}, "
            f"PGD {_fmt(last.get('val_robust'), True)}"
        )
    click.echo(f"run directory: {result.run_dir}   (metrics.jsonl, curves.png, checkpoints/)")
    c = result.cost
    click.echo(
        f"wall time: {result.wall_seconds:.1f} s"
        + (f"; {c['train_images_per_second']:.0f} training images/s" if c.get("train_images_per_second") else "")
        + f"; peak host memory {c.get('peak_host_memory_bytes', 0) / 2**30:.2f} GiB"
        + (
            f", GPU {c['peak_gpu_memory_bytes'] / 2**30:.2f} GiB, {c['gpu_hours']:.3f} GPU-hours"
            if c.get("peak_gpu_memory_bytes") is not None
            else ""
        )
    )
    distributed.finish()


@cli.group(cls=_Group, invoke_without_command=True)
@json_option()
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List installed defenses (built-in and third-party)."""
    if ctx.invoked_subcommand is not None:
        return
    from regdefense.host.discovery import catalogue

    infos = [i.to_dict() for i in catalogue().values()]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    rows = [
        {
            "name": i["name"],
            "dist": f"{i['distribution']} {i['version']}",
            "status": "ok"
            if i["status"] == "ok"
            else _clip(f"BROKEN: {i['error']}", 56) + f" (plugins show {i['name']})",
            "hooks": _clip(
                ", ".join(
                    h.removeprefix("regdefense_") + (" (wrapper)" if h in i["wrappers"] else "") for h in i["hooks"]
                ),
                64,
            ),
        }
        for i in infos
    ]
    click.echo(_table(rows, [("name", "defense"), ("dist", "distribution"), ("status", "status"), ("hooks", "hooks")]))
    from regdefense.host.tracking import available, missing

    usable, unusable = [], []
    for n, ep in sorted(available().items()):
        why = missing(ep)
        if why is None:
            usable.append(f"{n} ({ep.dist.metadata['Name'] if ep.dist else '?'})")
        else:
            unusable.append(f"  {n}: {_clip(why, 100)}")
    click.echo("\nexperiment trackers (--log NAME): " + (", ".join(usable) or "none"))
    if unusable:
        click.echo("not usable here:\n" + "\n".join(unusable))


@plugins.command("show")
@click.argument("name")
@json_option()
def plugins_show(name: str, as_json: bool) -> None:
    """Show a defense: its description, config fields (type, default, help) and hooks."""
    import inspect

    from regdefense.base.fields import describe
    from regdefense.host import contract
    from regdefense.host.discovery import get
    from regdefense.host.hookspecs import EXCLUSIVE

    info = get(name)
    assert info.cls is not None  # get() refuses a broken defense
    cls: Any = info.cls
    doc = inspect.getdoc(sys.modules[info.cls.__module__]) or inspect.getdoc(info.cls) or ""
    fields = describe(cls.Config)
    if as_json:
        click.echo(json.dumps({**info.to_dict(), "doc": doc, "config": fields}, indent=2, default=str))
        return
    click.echo(f"{name}  ({info.dist} {info.version}, {info.value})\n")
    if doc:
        click.echo(doc + "\n")
    click.echo(
        "hooks: "
        + ", ".join(
            h + (" (wrapper)" if h in info.wrappers else " (exclusive)" if h in EXCLUSIVE else "") for h in info.hooks
        )
    )
    for kind, title in (("publishes", "publishes on the step"), ("reads", "reads from the step")):
        keys = contract.declared_class(info.cls, kind)
        if keys:
            click.echo(f"{title}: " + ", ".join(str(k) + (" [required]" if k.required else "") for k in keys))
    click.echo(f"\nconfig fields (set with -o {name}.KEY=VALUE or [defense.{name}] in a run file):")
    click.echo(
        _table(
            fields,
            [("name", "field"), ("type", "type"), ("default", "default"), ("limits", "limits"), ("help", "help")],
        )
    )


@cli.command()
@click.argument("run", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torch-export", "torchscript", "robustbench"]),
    default="safetensors",
    show_default=True,
    help="safetensors weights (+ config.json), a torch.export program model.pt2 (+ config.json), a TorchScript "
    "program (deprecated by torch; + config.json), or RobustBench's model-info JSON from the run's AutoAttack "
    "evaluation.",
)
@checkpoint_option
@out_option("Where to write (default RUN_DIR/export).")
def export(run, fmt, which, out) -> None:
    """Write a run's evaluated model as safetensors, a torch.export program or TorchScript, with a config.json."""
    from regdefense.interop.export import export as run_export

    files = run_export(run, fmt=fmt, out=out, which=which)
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))


@cli.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("repo")
@checkpoint_option
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", help="Branch to push to (default main).")
@click.option("--token", help="Hugging Face token (default: the one `hf auth login` saved, or HF_TOKEN).")
@click.option(
    "--to-cache",
    is_flag=True,
    help="Write the repository into the local Hugging Face cache instead of "
    "uploading it (no network; hf:REPO then loads offline).",
)
def push(run, repo, which, private, revision, token, to_cache) -> None:
    """Upload a run to the Hugging Face Hub as REPO (ORG/NAME): safetensors weights, config.json and a model card."""
    from regdefense.interop.hub import push as hub_push

    result = hub_push(run, repo, which=which, private=private, revision=revision, token=token, to_cache=to_cache)
    click.echo(f"{'cached' if to_cache else 'pushed'} {result['repo']}@{result['revision']}: {result['where']}")
    click.echo(f"load it with: regdefense evaluate hf:{result['repo']}   or   --init hf:{result['repo']}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--plot", type=click.Path(dir_okay=False), help="Also write a bar chart (mean ± std per recipe) here.")
@json_option("Print the groups and runs as JSON.")
def compare(runs, plot, as_json) -> None:
    """Mean ± std of clean, PGD and AutoAttack accuracy and cost per recipe over existing run directories (a folder
    that is no run, such as a sweep's, is searched for runs)."""
    from regdefense.sweeps import compare as cmp

    rows = [cmp.read_run(r) for r in cmp.find_runs(list(runs))]
    cmp.split_recipes(rows)
    groups = cmp.group(rows)
    if as_json:
        click.echo(
            json.dumps(
                {"groups": groups, "runs": [{k: v for k, v in r.items() if k != "settings"} for r in rows]}, indent=2
            )
        )
    else:
        click.echo(cmp.table(groups, rows))
    if plot:
        cmp.plot(groups, Path(plot))
        if not as_json:
            click.echo(f"wrote {plot}")


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path())
@click.option(
    "--seeds",
    "seeds",
    type=click.IntRange(0, SEED_MAX),
    multiple=True,
    metavar="N...",
    help="Seeds to run each recipe with: --seeds 0 1 2 (default 0 1 2).",
)
@click.option(
    "-o",
    "--override",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Applied to every run (e.g. -o train.device=cuda).",
)
@out_option("Runs go to OUT/<recipe>/seed<k>.", default="runs/sweep", show_default=True)
@click.option(
    "--attacks",
    "attacks",
    multiple=True,
    metavar="SUITE",
    help="Also evaluate each run with these suites (e.g. autoattack) for the table's AutoAttack column.",
)
@n_option("eval_n", "Evaluate only the first N test points.")
@click.option(
    "--print",
    "print_only",
    is_flag=True,
    help="Print the commands (one run per line) instead of running them: for a cluster's job array.",
)
@click.option("--plot", type=click.Path(dir_okay=False), help="Also write the comparison bar chart here.")
@json_option("Print the groups and runs as JSON.")
@quiet_option("Only a line as each run starts and ends: no bars, no epoch lines.")
@click.option(
    "--launcher",
    type=click.Choice(["local", "submitit"]),
    default="local",
    show_default=True,
    help="local: one run after another here; submitit: every run a job (Slurm, requeued on pre-emption).",
)
@click.option(
    "--cluster",
    type=click.Choice(["auto", "slurm", "local"]),
    default="auto",
    show_default=True,
    help="For --launcher submitit: Slurm, local processes, or auto (Slurm where sbatch is found).",
)
@click.option("--partition", help="Slurm partition (default: the recipe's [slurm] partition).")
@click.option("--gpus", type=click.IntRange(min=0), help="GPUs per run (default: the recipe's [slurm] gpus, or 0).")
@click.option("--cpus", type=click.IntRange(min=1), help="CPUs per run.")
@click.option("--mem", "mem_gb", type=click.FloatRange(min=0), help="Memory per run, GB.")
@click.option("--time", "time_min", type=click.IntRange(min=1), help="Time limit per run, minutes (default 1440).")
@click.option("--no-wait", is_flag=True, help="With submitit: submit and return; `sweep ... --status` reads later.")
@click.option("--status", is_flag=True, help="Print the table of what has landed so far; run nothing.")
def sweep(
    recipes,
    seeds,
    overrides,
    out,
    attacks,
    eval_n,
    print_only,
    plot,
    as_json,
    quiet,
    launcher="local",
    cluster="auto",
    partition=None,
    gpus=None,
    cpus=None,
    mem_gb=None,
    time_min=None,
    no_wait=False,
    status=False,
) -> None:
    """Run every RECIPE (a TOML run file) with every seed, then print mean ± std per recipe (`compare`)."""
    from regdefense.sweeps import compare as cmp
    from regdefense.sweeps import sweep as sw

    # `--seeds 0 1 2`: click gives the option its first value and the rest to RECIPES; they are seeds, not files
    more = [r for r in recipes if r.isdigit() and not Path(r).exists()] if seeds else []
    recipes = [r for r in recipes if r not in more]
    if not recipes:
        raise click.UsageError("give at least one recipe (a TOML run file)")
    jobs = sw.plan(recipes, [*seeds, *map(int, more)] or [0, 1, 2], out, list(overrides))
    if print_only:
        for job in jobs:
            click.echo(job.command(list(attacks), eval_n))
        return

    def echo(message: str) -> None:
        click.echo(message, err=as_json)

    if status:
        rows = [sw._row(job, cmp) for job in jobs]
    elif launcher == "submitit":
        from regdefense.sweeps import cluster as cl

        given = {"partition": partition, "gpus": gpus, "cpus": cpus, "mem_gb": mem_gb, "time_min": time_min}
        submitted = cl.submit(
            jobs,
            folder=Path(out) / ".submitit",
            given=given,
            attacks=list(attacks),
            eval_n=eval_n,
            cluster=None if cluster == "auto" else cluster,
            echo=echo,
        )
        if no_wait:
            click.echo(f"submitted; the table as runs land: regdefense sweep ... --out {out} --status")
            return
        rows = cl.collect(submitted, echo=echo)
    else:
        rows = sw.run(jobs, attacks=list(attacks), eval_n=eval_n, echo=echo, progress=not quiet)
    groups = cmp.group(rows)
    lean = [{k: v for k, v in r.items() if k != "settings"} for r in rows]
    click.echo(json.dumps({"groups": groups, "runs": lean}, indent=2) if as_json else "\n" + cmp.table(groups, rows))
    if plot:
        cmp.plot(groups, Path(plot))


@cli.command("new-plugin")
@click.argument("name")
@click.option(
    "--dir",
    "where",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where to create the package folder regdefense-NAME.",
)
def new_plugin(name: str, where: str) -> None:
    """Write a defense plugin package that installs and passes its own test (pyproject, module, test, README)."""
    from regdefense.host.template import new_plugin as write

    root = write(name, where)
    click.echo(f'wrote {root}\nnext: cd {root} && pip install -e ".[test]" && python -m pytest')


@cli.command()
def datasets() -> None:
    """List the named datasets: image shape, classes, default ε, augmentation and model (model.name=auto)."""
    for name, spec in sorted(DATASETS.all().items()):
        shape = "×".join(map(str, spec.shape))
        click.echo(
            f"{name:14s} {shape:9s} {spec.num_classes:4d} classes  ε {spec.default_eps:.4g}  augment "
            f"{spec.augment:9s} model {spec.model or 'by image size'}" + (f"  ({spec.about})" if spec.about else "")
        )
    click.echo(f"{'FOLDER':14s} train.npz/test.npz, train/ and test/ image folders, or WebDataset shards")


@cli.command()
def models() -> None:
    """List the architectures of the model zoo."""
    from regdefense.models import MODELS

    for name, factory in sorted(MODELS.all().items()):
        doc = (factory.__doc__ or "").strip().splitlines()
        click.echo(f"{name:18s} {doc[0] if doc else ''}")
    click.echo(f"{'timm:NAME':18s} any timm architecture (`timm.list_models()`), e.g. timm:convnext_tiny")
    click.echo(
        f"{'robustbench:NAME':18s} a RobustBench zoo entry's architecture, e.g. "
        f"robustbench:Wang2023Better_WRN-28-10 (model.pretrained: with its weights)"
    )


def main() -> None:
    import warnings

    from regdefense.advisories import warning
    from regdefense.host.discovery import ContractWarning

    advisory = warning()  # known-vulnerable dependency versions (torchattacks' requests pin): one line, every command
    if advisory and not os.environ.get("REGDEFENSE_NO_ADVISORY_WARNING"):
        click.echo(advisory, err=True)

    plain = warnings.showwarning

    def show(message, category, *args, **kwargs):  # contract warnings read as one line, not a source location
        if issubclass(category, ContractWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            plain(message, category, *args, **kwargs)

    warnings.showwarning = show
    cli(prog_name="regdefense")


@cli.command()
@click.argument("target", type=click.Path())
@click.option(
    "--attacks",
    "suites",
    multiple=True,
    metavar="SUITE_OR_SPEC",
    help="quick (default), paper-001, paper-002, autoattack (official code), autoattack-ta (torchattacks), "
    "autoattack-rand, autoattack-rand-ta, eot-pgd, bpda-pgd, or an attack spec such as "
    "'torchattacks:PGD(eps=0.1, alpha=0.01, steps=50)' or 'art:HopSkipJump'. Repeat for several.",
)
@click.option("--eps", type=float, help="Perturbation budget (default: the run's threat ε; paper-001: 0.1).")
@n_option("n", "Evaluate the first N test points.")
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    metavar="N",
    help="Evaluate N points at a time (decoded, attacked, dropped) and merge: memory follows N, not the test "
    "set (ImageNet's 50 000 validation images).",
)
@click.option(
    "--subset",
    metavar="robustbench|FILE",
    help="Evaluate a fixed subset of a streamed image-folder test split: robustbench (RobustBench's 5 000 "
    "ImageNet validation images, from the robustbench package) or a file of CLASS/FILE lines.",
)
@seed_option("Seed for the attacks' randomness.", default=0, show_default=True)
@checkpoint_option
@click.option(
    "--arch",
    help="For a user's own model file: an architecture name (a state_dict or RobustBench-format checkpoint), "
    "'torch-export' (a .pt2 program; the default for .pt2 files) or 'torchscript' (both need --trust-code).",
)
@click.option(
    "--trust-code",
    is_flag=True,
    help="Load a .pt2 (torch.export) or TorchScript program, file or export folder: these are code that runs, not "
    "data, and are refused without this flag. Only for files from a source you trust.",
)
@click.option("--dataset", help="Evaluate on this dataset's test split (default: the run's; digits for model files).")
@device_option(default="auto", show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Starting batch size (halved automatically on GPU out-of-memory).",
)
@click.option("--no-checks", is_flag=True, help="Skip the sanity checks.")
@click.option(
    "--adaptive",
    type=click.Choice(["auto", "off"]),
    default="auto",
    show_default=True,
    help="auto: each sanity check that warns runs the attack that answers it (transfer, decision-based, EOT, BPDA, "
    "longer PGD) and the best-known number comes first; off: the checks only warn.",
)
@click.option(
    "--adaptive-budget",
    type=click.FloatRange(min=0),
    default=600,
    show_default=True,
    metavar="SECONDS",
    help="Time the escalations of --adaptive auto may take together.",
)
@click.option(
    "--surrogate",
    default="auto",
    show_default=True,
    metavar="auto|train|none|RUN",
    help="The transfer check's clean surrogate: auto (the evaluated architecture trained without defenses, once, "
    "in the cache, when its estimated cost is within --surrogate-budget), train (the same whatever it costs), none, "
    "or a run directory or checkpoint of a model trained without defenses on the same data.",
)
@click.option(
    "--surrogate-budget",
    type=click.FloatRange(min=0),
    default=300,
    show_default=True,
    metavar="SECONDS",
    help="--surrogate auto trains no surrogate estimated to take longer than this.",
)
@click.option(
    "--surrogate-epochs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Epochs of the automatic surrogate.",
)
@click.option(
    "--certify",
    type=click.Choice(["ibp", "smoothing"]),
    help="Also certify: ibp, the verified accuracy by interval bound propagation (L∞, a certified lower bound); "
    "smoothing, randomized smoothing (Cohen et al. 2019): the Gaussian-smoothed classifier's prediction or abstention "
    "and certified L2 radius per point, in a table (certified accuracy at --radii, abstain rate) and plot of its own, "
    "never mixed with the empirical rows. Needs --sigma.",
)
@click.option(
    "--sigma", type=float, help="--certify smoothing: the noise level σ (the one the model was trained with)."
)
@click.option(
    "--n0", type=click.IntRange(min=1), default=100, show_default=True, help="--certify smoothing: selection draws."
)
@click.option(
    "--n-samples",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="--certify smoothing: estimation draws per point (Cohen et al.'s 100 000: long work, see the ETA).",
)
@click.option(
    "--alpha",
    type=float,
    default=0.001,
    show_default=True,
    help="--certify smoothing: failure probability of each point's certificate.",
)
@click.option(
    "--mc-batch",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="--certify smoothing: noisy copies per forward pass (the noise depends on it: keep it to resume).",
)
@click.option(
    "--radii",
    metavar="R1,R2,...",
    help="--certify smoothing: the L2 radii of the certified table (default 0,0.25,0.5,0.75,1; digits "
    "0,0.1,0.25,0.5,0.75,1).",
)
@click.option(
    "--shard",
    metavar="K/N",
    help="Evaluate only the K-th of N slices of the points and write a partial (for a job array; default --out "
    "RUN_DIR/eval/shard-K-of-N); `regdefense merge` assembles the report. Under torchrun the ranks share the "
    "points without it.",
)
@click.option("--no-resume", is_flag=True, help="Start over instead of continuing from OUT/progress.pt.")
@out_option("Where to write the reports (default RUN_DIR/eval).")
@json_option("Print report.json to stdout.")
@quiet_option()
def evaluate(
    target,
    suites,
    eps,
    n,
    chunk,
    subset,
    seed,
    which,
    arch,
    dataset,
    device,
    batch_size,
    no_checks,
    adaptive,
    adaptive_budget,
    surrogate,
    surrogate_budget,
    surrogate_epochs,
    certify,
    no_resume,
    out,
    as_json,
    quiet,
    trust_code,
    shard=None,
    sigma=None,
    n0=100,
    n_samples=100_000,
    alpha=0.001,
    mc_batch=1000,
    radii=None,
) -> None:
    """Measure robustness of a run, checkpoint or model file; write report.json, report.md and plots."""
    from regdefense.base import distributed
    from regdefense.evaluation.runner import evaluate as run_eval
    from regdefense.evaluation.smoothing import Settings

    smoothing = None
    if certify == "smoothing" and sigma is not None:
        try:
            table = tuple(float(r) for r in radii.split(",")) if radii else None
        except ValueError:
            raise click.BadParameter(f"not a list of numbers: {radii!r}", param_hint="--radii") from None
        smoothing = Settings(sigma, n0, n_samples, alpha, mc_batch, seed, table)

    report, files = run_eval(
        target,
        suites=list(suites) or None,
        eps=eps,
        n=n,
        chunk=chunk,
        subset=subset,
        seed=seed,
        which=which,
        arch=arch,
        dataset=dataset,
        device=device,
        batch_size=batch_size,
        checks=not no_checks,
        adaptive=adaptive,
        adaptive_budget=adaptive_budget,
        out=out,
        progress=not quiet and not as_json,
        resume=not no_resume,
        surrogate=None if surrogate == "none" else surrogate,
        surrogate_epochs=surrogate_epochs,
        surrogate_budget=surrogate_budget,
        certify=certify,
        trust_code=trust_code,
        shard=shard,
        smoothing=smoothing,
    )
    if not files:
        distributed.finish(wait=False)  # torchrun: rank 0 writes and prints the report
    if "partial" in files:
        click.echo(f"wrote {files['partial']} (shard {shard}); when every shard is done: regdefense merge FOLDER...")
        return
    _print_report(report, files, as_json)
    distributed.finish(wait=False)


@cli.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True))
@out_option("Where to write the report (default: their parent).")
@json_option("Print report.json to stdout.")
def merge(folders, out, as_json) -> None:
    """Assemble the report of an evaluation run as `evaluate --shard K/N` jobs from their partials' FOLDERS."""
    from regdefense.evaluation.runner import merge_shards

    report, files = merge_shards(list(folders), out)
    _print_report(report, files, as_json)


def _print_report(report, files, as_json: bool) -> None:
    from regdefense.evaluation.report import markdown

    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    click.echo(markdown(report).split("![")[0].rstrip())
    latest = [str(p) for k, p in files.items() if k in ("json", "md", "eps_plot", "examples", "certified_plot")]
    click.echo("\nwrote " + ", ".join(latest))
    click.echo(f"this evaluation is kept in {files['evaluation']}; every evaluation here: {files['evaluations_md']}")
