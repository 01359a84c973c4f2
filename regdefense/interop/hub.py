"""Models to and from the Hugging Face Hub: ``regdefense push RUN ORG/NAME`` and ``hf:ORG/NAME`` targets.

A pushed repository is a safetensors export (:mod:`regdefense.interop.export`: ``model.safetensors`` and ``config.json``
with the architecture, normalisation, threat model and resolved config) plus a model card (``README.md``) made from
the run: recipe, stack, data, seed, cost, the final table and the latest ``regdefense evaluate`` report.
``hf:ORG/NAME`` (or ``hf:ORG/NAME@REVISION``) is accepted wherever a run is (``evaluate``, ``--init``); it is
fetched through huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` uses what the cache holds and never the network.

``push(..., to_cache=True)`` (``regdefense push --to-cache``) writes the repository into the local cache in
huggingface_hub's layout instead of uploading it: for machines without a network (copy the cache over), and to
see exactly what an upload would contain.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from regdefense.base.errors import UserError, first_line
from regdefense.interop.export import export
from regdefense.models.weights import download, parse

__all__ = ["FILES", "download", "model_card", "parse", "push", "stage", "write_to_cache"]

FILES = ("model.safetensors", "config.json", "README.md")


def stage(run: str | Path, *, which: str = "best", out: str | Path | None = None) -> Path:
    """The folder a push uploads: the safetensors export of ``run`` and its model card."""
    run = Path(run)
    folder = Path(out) if out is not None else run / "export" / "hub"
    files = export(run, fmt="safetensors", out=folder, which=which)
    info = json.loads(files["config"].read_text())
    (folder / "README.md").write_text(model_card(run, info))
    return folder


def push(
    run: str | Path,
    repo_id: str,
    *,
    which: str = "best",
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    to_cache: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Upload ``run``'s export and model card to ``repo_id`` (created if missing), or with ``to_cache`` write them
    into the local huggingface_hub cache. Returns ``{"repo": ..., "files": [...], "where": url or folder}``."""
    repo_id, rev = parse(repo_id)
    rev = revision or rev
    folder = stage(run, which=which)
    where: Any
    if to_cache:
        where = write_to_cache(folder, repo_id, revision=rev or "main", cache_dir=cache_dir)
    else:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                folder_path=str(folder),
                repo_id=repo_id,
                revision=rev,
                allow_patterns=list(FILES),
                commit_message=f"regdefense push of {Path(run).name}",
            )
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise UserError(
                f"pushing to {repo_id} failed: {first_line(exc, 300)} (log in with `hf auth "
                f"login` or pass --token; --to-cache writes the files locally instead)"
            ) from None
        where = getattr(info, "commit_url", None) or str(info)
    return {"repo": repo_id, "revision": rev or "main", "files": [str(folder / f) for f in FILES], "where": str(where)}


def write_to_cache(folder: Path, repo_id: str, *, revision: str = "main", cache_dir: str | Path | None = None) -> Path:
    """Place ``folder``'s files in huggingface_hub's cache layout (``models--ORG--NAME/{refs,snapshots}``) under a
    commit hash computed from their content; return the snapshot folder."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    digest = hashlib.sha1()
    for name in FILES:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    commit = digest.hexdigest()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(folder / name, snapshot / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snapshot


def model_card(run: Path, info: dict[str, Any]) -> str:
    """A Hub model card from the run's files: what was trained on what, how, at what cost, and how robust it is."""
    config = info["config"]
    stack = "+".join(info.get("stack") or []) or "clean"
    data, train = config.get("data") or {}, config.get("train") or {}
    eps = info["threat"]["eps"]
    summary, report = _read_json(run / "summary.json"), _read_json(run / "eval" / "report.json")
    lines = [
        "---",
        "library_name: regdefense",
        "tags:",
        "- adversarial-robustness",
        "- adversarial-training",
        "- image-classification",
        *[f"- {d}" for d in (info.get("stack") or [])],
        f"datasets:\n- {info.get('dataset')}",
        *_model_index(run.name, info, summary, report),
        "---",
        "",
        f"# {run.name}",
        "",
        f"An image classifier trained with **regdefense** (stack `{stack}`) on `{info.get('dataset')}` against "
        f"{info['threat']['norm']} perturbations of ε = {eps:.4g} ({eps * 255:.3g}/255).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{info['architecture']}` ({info['evaluated_model']}) |",
        f"| inputs | {info['inputs']}, shape {info['input_shape']}, {info['num_classes']} classes |",
        f"| stack | `{stack}` |",
        *[
            f"| `{name}` settings | " + ", ".join(f"{k}={json.dumps(v)}" for k, v in (values or {}).items()) + " |"
            for name, values in (config.get("defense") or {}).items()
        ],
        f"| data | `{data.get('name')}` |",
        f"| seed | {train.get('seed')} |",
        f"| epochs | {info.get('epoch')} of {train.get('epochs')}, batch {train.get('batch_size')}, "
        f"{train.get('optimizer')} lr {train.get('lr')} ({train.get('schedule')}) |",
    ]
    cost = (summary or {}).get("cost") or {}
    if cost:
        lines.append(
            f"| cost | {cost.get('wall_seconds', 0):.0f} s wall, "
            + (
                f"{cost['train_images_per_second']:.0f} training images/s, "
                if cost.get("train_images_per_second")
                else ""
            )
            + f"{cost.get('gpu_hours', 0):.3f} GPU-hours |"
        )
    if summary:
        lines += [
            "",
            "## Final table (torchattacks PGD on the test split)",
            "",
            "| model | clean | robust | attack | n |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {100 * r['clean']:.2f}% | {100 * r['robust']:.2f}% | {r['attack']} | {r['n']} |"
            for r in summary["table"]
        ]
    if report:
        meta = report["meta"]
        lines += [
            "",
            f"## `regdefense evaluate` ({meta.get('n')} test points, ε = {float(meta['eps']):.4g})",
            "",
            f"Clean accuracy {100 * report['clean']:.2f}%.",
            "",
            "| suite | attack | robust accuracy |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['suite']} | {r['label']} | {100 * r['robust']:.2f}% |"
            for r in report["rows"]
            if r.get("kind") in ("attack", "group worst case", "worst case", "best known")
        ]
    else:
        lines += [
            "",
            "No `regdefense evaluate` report yet: run `regdefense evaluate RUN --attacks autoattack` before "
            "pushing to publish the official AutoAttack figure.",
        ]
    lines += [
        "",
        "## Recipe",
        "",
        "`config.json` holds the run's whole resolved configuration (key `config`); "
        "to train it again, write its sections as a TOML run file and run "
        f"`regdefense train --config recipe.toml --seed {train.get('seed')}`.",
    ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from regdefense.interop.export import load",
        "",
        'model = load(snapshot_download("ORG/NAME"))  # inputs in [0, 1]; normalisation is inside',
        "```",
        "",
        "or `regdefense evaluate hf:ORG/NAME --attacks autoattack`.",
        "",
    ]
    return "\n".join(lines)


def _model_index(name: str, info: dict[str, Any], summary: dict | None, report: dict | None) -> list[str]:
    """The Hub's ``model-index`` metadata: clean accuracy and the headline robust accuracy (the evaluate report's
    official AutoAttack when it ran, else its worst case, else the final table's PGD)."""
    metrics = []
    threat = f"{info['threat']['norm']}, eps={info['threat']['eps']:.4g}"
    if report:
        metrics.append(("accuracy", 100 * report["clean"], "clean accuracy"))
        aa = [r for r in report["rows"] if r["suite"] == "autoattack" and r["kind"] == "group worst case"]
        worst = aa[0] if aa else next((r for r in report["rows"] if r["kind"] == "worst case"), None)
        if worst is not None:
            label = "AutoAttack" if aa else "worst case of regdefense evaluate"
            metrics.append(("robust-accuracy", 100 * worst["robust"], f"{label} ({threat})"))
    elif summary:
        row = summary["table"][0]
        metrics += [
            ("accuracy", 100 * row["clean"], "clean accuracy"),
            ("robust-accuracy", 100 * row["robust"], f"{row['attack']}"),
        ]
    if not metrics:
        return []
    out = [
        "model-index:",
        f"- name: {name}",
        "  results:",
        "  - task:",
        "      type: image-classification",
        "    dataset:",
        f"      name: {info.get('dataset')}",
        f"      type: {info.get('dataset')}",
        "    metrics:",
    ]
    for kind, value, label in metrics:
        out += [f"    - type: {kind}", f"      value: {value:.2f}", f"      name: {json.dumps(label)}"]
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
