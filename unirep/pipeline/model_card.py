"""The model card of an exported student: ``student/README.md``, written once with the export.

It says what the student is and how it came to be: the data (source, root, images per split and
stream, preprocessing), the tasks, the teachers it was distilled from (weights hashes and cache
keys), the recipe (architecture, distillation, task weighting, training), the metrics of the run
with the split they were measured on (and the validation split that selected the weights), and
the command that reproduces it. Everything in it comes from the run's config, manifest and
metrics; nothing depends on the clock, so a run killed and resumed writes the same card.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import yaml

from unirep.config.load import flatten, preset_names, read_config, to_dict
from unirep.config.schema import Config
from unirep.errors import ConfigError

MAIN_COMMAND = "accelerate launch scripts/distill.py"
"""How the README's main command runs a recipe (``unirep-distill`` is the installed equivalent)."""

NOT_REPRODUCING = {"resume", "overwrite"}
"""Config keys that say how a run was started, not what it computes: left out of the command."""

_SUMMARY_ROWS = (
    ("delta_m_vs_teachers", "Δm of the student vs the teachers (%)", "+.2f"),
    ("baseline_delta_m_vs_teachers", "Δm of the baseline vs the teachers (%)", "+.2f"),
    ("delta_m_vs_baseline", "Δm of the student vs the baseline (%)", "+.2f"),
    ("delta_m_vs_full_label_teachers", "Δm of the student vs full-label teachers (%)", "+.2f"),
    ("mean_accuracy", "student mean accuracy", ".4f"),
    ("baseline_mean_accuracy", "baseline mean accuracy", ".4f"),
    ("teacher_mean_accuracy", "teachers' mean accuracy", ".4f"),
    ("decathlon_score", "Decathlon score (E_max = 2 × the teacher's error)", ".1f"),
)
_ROLES = (
    ("student", "student"),
    ("teacher", "teachers"),
    ("baseline", "baseline (no distillation)"),
    ("full_label_teacher", "full-label teachers"),
)


def _value(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


def _yaml(value: Any) -> str:
    """One override's value as the command line writes it (YAML flow style, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20)
    return text.strip().removesuffix("...").strip()


def _reproducing(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in NOT_REPRODUCING}


def run_overrides(cfg: Config) -> list[str] | None:
    """The ``key=value`` overrides that turn the shipped preset ``cfg.preset`` into ``cfg``
    (``resume`` and ``overwrite`` aside), checked by reading them back; None when ``cfg.preset``
    is not a shipped preset or the overrides do not give ``cfg`` back."""
    if cfg.preset not in preset_names():
        return None
    mine_tree = to_dict(cfg)
    base, mine = flatten(to_dict(read_config(cfg.preset))), flatten(mine_tree)
    changed = [k for k in mine if base.get(k, ...) != mine[k]]
    changed += [k for k in base if k not in mine]  # a preset key the run does not have
    overrides: list[str] = []
    whole: list[str] = []  # sections written whole: nothing under them is written again
    for key in changed:
        if key.split(".")[0] in NOT_REPRODUCING or any(key.startswith(f"{w}.") for w in whole):
            continue
        if key in mine:
            overrides.append(f"{key}={_yaml(mine[key])}")
            continue
        parent = key
        while "." in parent:  # the nearest section the run has: written whole
            parent = parent.rsplit(".", 1)[0]
            try:
                value = _value(mine_tree, parent)
            except (KeyError, TypeError):
                continue
            overrides.append(f"{parent}={_yaml(value)}")
            whole.append(parent)
            break
    try:
        back = read_config(cfg.preset, overrides)
    except (ConfigError, KeyError, TypeError, ValueError):
        return None
    return overrides if _reproducing(to_dict(back)) == _reproducing(mine_tree) else None


def reproduce_command(cfg: Config, config_file: str) -> str:
    """The command that runs ``cfg`` again: the README's main command with the preset and the
    overrides of :func:`run_overrides`, or with the run's resolved ``config_file``."""
    overrides = run_overrides(cfg)
    if overrides is None:
        return f"{MAIN_COMMAND} --config {shlex.quote(config_file)}"
    words = [MAIN_COMMAND, "--config", cfg.preset, *(shlex.quote(o) for o in overrides)]
    return " ".join(words)


def _number(value: Any, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    tasks = metrics["tasks"]
    roles = [(r, label) for r, label in _ROLES if any(r in e for e in tasks.values())]
    lines = [
        "| task | metric | " + " | ".join(label for _, label in roles) + " |",
        "|:---|:---|" + "---:|" * len(roles),
    ]
    for task, entry in tasks.items():
        for metric in entry["student"]:
            cells = [_number(entry.get(r, {}).get(metric)) for r, _ in roles]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return lines


def _summary(metrics: dict[str, Any]) -> list[str]:
    s = metrics["summary"]
    lines = [
        f"- {label}: {_number(s[key], spec)}" for key, label, spec in _SUMMARY_ROWS if key in s
    ]
    if "delta_m_metrics" in s:
        lines.append(f"- Δm is over the main metrics: {', '.join(s['delta_m_metrics'])}")
    params = s.get("params", {})
    if params:
        lines.append(
            "- parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items())
        )  # fmt: skip
    return lines


def _recipe(cfg: Config) -> dict[str, Any]:
    """The config sections that make the student (the whole config is ``../config.yaml``)."""
    values = to_dict(cfg)
    recipe: dict[str, Any] = {"seed": cfg.seed}
    if cfg.dense is not None:
        recipe["dense"] = values["dense"]
    else:
        spec = values["classification"]
        student = (
            "backbone",
            "backbone_kwargs",
            "adapter",
            "residual_adapters",
            "task_loss",
            "prediction_loss",
            "init_from_teacher",
            "selection_metric",
            "batch_sizes",
        )
        recipe["classification"] = {k: spec[k] for k in student}
    recipe["distill"] = values["distill"]
    recipe["weighting"] = values["weighting"]
    train = values["train"]
    keys = ("max_steps", "optim", "adapter_optim", "grad_clip", "gradient_accumulation_steps")
    recipe["train"] = {k: train[k] for k in keys}
    teachers = values["teachers"]
    recipe["teachers"] = {"train": {k: teachers["train"][k] for k in ("max_steps", "optim")}}
    if cfg.classification is not None and cfg.classification.finetune_from:
        spec = values["classification"]  # the other teachers start from this task's
        recipe["teachers"]["finetune_from"] = spec["finetune_from"]
        tuned = spec["finetune_train"] or teachers["train"]
        recipe["teachers"]["finetune_train"] = {k: tuned[k] for k in ("max_steps", "optim")}
    recipe["data"] = {"batch_size": values["data"]["batch_size"]}
    return recipe


def model_card(
    manifest: dict[str, Any],
    metrics: dict[str, Any],
    cfg: Config,
    data: dict[str, Any],
    command: str,
) -> str:
    """The markdown of ``student/README.md``: its sections, each followed by a blank line.

    Args:
        manifest: the student's manifest (``unirep.pipeline.export``), weights hash included.
        metrics: the run's ``metrics.json`` content (entries with ``seconds`` are left out).
        cfg: the run's resolved config.
        data: ``{"source", "root", "images": {split: {stream: count}}}``.
        command: the command that reproduces the run (:func:`reproduce_command`).
    """
    sections = [
        _title(manifest, cfg),
        _files_section(manifest),
        _data_section(manifest, data, metrics["split"]),
        _tasks_section(manifest["tasks"]),
        _teachers_section(manifest["teachers"]),
        _recipe_section(manifest, cfg),
        _metrics_section(metrics),
        _command_section(command),
    ]
    return "\n".join(line for section in sections for line in [*section, ""])


def _title(manifest: dict[str, Any], cfg: Config) -> list[str]:
    """The card's title and what the student is: its trunk, heads, version and teachers."""
    arch = manifest["architecture"]
    trunk = arch.get("backbone") or arch.get("encoder")
    network = f"One shared {trunk} network with {len(manifest['tasks'])} task heads"
    if arch.get("sharing") == "smtl":  # Guo, Ye & Zhang, arXiv 2111.10601
        picked = (arch.get("sharing_kwargs") or {}).get("selected")
        network = (
            f"An SMTL network (Safe Multi-Task Learning: a public {trunk} encoder, a private one "
            f"per task and a learned gate between them) with {len(manifest['tasks'])} task heads"
            + (
                f", exported as the Lite network of the encoders its tasks picked "
                f"({', '.join(f'{t}: {p}' for t, p in picked.items())})"
                if picked
                else ""
            )
        )
    if manifest.get("packed"):  # a pruned student (DiSparse): its mostly-zero weights packed
        network += (
            f", pruned ({len(manifest['packed'])} weight tensors at least half zeros, stored "
            "packed: the kept values and a bitmask)"
        )
    return [
        f"# unirep student: {cfg.preset} / {cfg.name}",
        "",
        f"{network}, distilled by unirep "
        f"{manifest['unirep_version']} from {len(manifest['teachers'])} single-task teachers "
        "(Universal Representations, Li, Liu & Bilen, IJCV 2023).",
    ]


def _files_section(manifest: dict[str, Any]) -> list[str]:
    """The files of the exported folder: weights (with their hash), manifest, timm backbone."""
    backbone = manifest.get("timm_backbone") or {}
    lines = [
        "## Files",
        "",
        f"- `model.safetensors` (sha256 `{manifest['weights_sha256']}`): the whole student; "
        '`unirep.load_student("<this folder>")` loads it (`predict`, `features`, `evaluate`).',
        "- `manifest.json`: tasks, preprocessing, teachers and selection, read by the loader.",
    ]
    if backbone.get("folder"):
        lines.append(
            f"- `{backbone['folder']}/`: the shared backbone alone, timm's `"
            f"{backbone['architecture']}` (sha256 `{backbone['weights_sha256']}`): "
            f'`timm.create_model("local-dir:<this folder>/{backbone["folder"]}", '
            "pretrained=True)`"
            + (
                f" after `import unirep`, or with torch alone the `torch.export` program "
                f"`{backbone['folder']}/{program['file']}` (sha256 `{program['sha256']}`): "
                f'`torch.export.load("<this folder>/{backbone["folder"]}/{program["file"]}")'
                ".module()`."
                if (program := backbone.get("program"))
                else " (a stock timm architecture: timm alone loads it)."
            )
        )
    else:
        lines.append(f"- no timm backbone: {backbone.get('reason', 'exported before unirep 0.3')}.")
    return lines


def _data_section(manifest: dict[str, Any], data: dict[str, Any], split: str) -> list[str]:
    """The data: source, root, images per split and stream, the splits of selection and
    metrics, and the preprocessing of each input stream."""
    return [
        "## Data",
        "",
        f"- source: `{data['source']}`, root `{data['root']}`",
        "- images per split and stream: "
        + "; ".join(
            f"{s} " + ", ".join(f"{stream} {n}" for stream, n in counts.items())
            for s, counts in data["images"].items()
        ),
        "- model selection on the `val` split (held out from training); metrics below on "
        f"the `{split}` split",
        "",
        "Preprocessing per input stream (what `predict` and `features` apply):",
        "",
        *(f"- `{s}`: `{json.dumps(p)}`" for s, p in manifest["preprocessing"].items()),
    ]


def _tasks_section(tasks: dict[str, Any]) -> list[str]:
    """The table of the student's tasks: kind, stream, outputs and main metric."""
    return [
        "## Tasks",
        "",
        "| task | kind | stream | outputs | main metric |",
        "|:---|:---|:---|---:|:---|",
        *(
            f"| {n} | {t['kind']} | {t['stream']} | {t['out_channels']} | {t['main_metric']} |"
            for n, t in tasks.items()
        ),
    ]


def _teachers_section(teachers: dict[str, Any]) -> list[str]:
    """The table of the teachers: weights hash, cache key and validation metrics."""
    lines = [
        "## Teachers",
        "",
        "| task | weights sha256 | cache key | validation |",
        "|:---|:---|:---|:---|",
    ]
    for name, record in teachers.items():
        val = ", ".join(f"{m} {_number(v)}" for m, v in (record.get("val_metrics") or {}).items())
        lines.append(f"| {name} | `{record['weights_sha256']}` | `{record.get('key')}` | {val} |")
    return lines


def _recipe_section(manifest: dict[str, Any], cfg: Config) -> list[str]:
    """The architecture, the validation selection and the key settings (:func:`_recipe`)."""
    selection = manifest.get("selection", {})
    chosen = ", ".join(
        f"{k} {_number(v) if isinstance(v, float) else v}" for k, v in selection.items()
    )
    return [
        "## Recipe",
        "",
        f"Architecture: `{json.dumps(manifest['architecture'])}`. Selected on validation: "
        f"{chosen}. The key settings (the whole resolved config is the run's `config.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(_recipe(cfg), sort_keys=False, default_flow_style=None, width=100).rstrip(),
        "```",
    ]


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    """The run's metrics on its split: the per-task table, then the summary lines."""
    return [
        f"## Metrics ({metrics['split']} split)",
        "",
        *_metrics_table(metrics),
        "",
        *_summary(metrics),
    ]


def _command_section(command: str) -> list[str]:
    """The command that reproduces the run."""
    return [
        "## Command",
        "",
        "```sh",
        command,
        "```",
        "",
        "(`unirep-distill` in place of `accelerate launch scripts/distill.py` where unirep is "
        "pip-installed.)",
    ]
