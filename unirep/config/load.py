"""Reading a config: a preset shipped in ``unirep/config/presets/`` or a YAML path, written as
changes to another preset (``base:``), then dotted ``key=value`` overrides, bound to the schema.

``read_config("mini-decathlon", ["train.max_steps=100"])`` returns a :class:`Config` whose keys,
types, choices and ranges are checked (:mod:`unirep.config.binder`); a key of unirep 0.3 is
refused naming its new place (:data:`MOVED`). What needs the registries or the data is checked by
the packages that own it, through :func:`unirep.pipeline.validate.load_config`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from unirep.config.binder import bind
from unirep.config.schema import Config
from unirep.errors import ConfigError
from unirep.io import atomic_write_text

DEFAULT_PRESET = "mini-decathlon"

_CLASSIFICATION_KEYS = {
    "model": ("backbone", "backbone_kwargs", "adapter", "residual_adapters"),
    "data": ("domains", "hf_domains", "batch_sizes", "resize", "crop", "crops", "no_flip",
             "square_resize"),
    "distill": ("task_loss", "prediction_loss", "init_from_teacher"),
    "teachers": ("finetune_from", "finetune_train", "finetune_lr"),
}  # fmt: skip
MOVED: dict[str, str] = {
    **{f"{s}.{k}": f"classification.{k}" for s, keys in _CLASSIFICATION_KEYS.items() for k in keys},
    "train.selection_metric": "classification.selection_metric",
    "partial": "dense.partial",
    "xtask": "dense.transfer",
    "dense.depth_kind": "dense.inverse_depth",
}
"""Keys (and sections) of unirep 0.3 and their place since 0.4 (``docs/changes.md``)."""

_NOTES = {
    "train.selection_metric": "dense runs always select on delta_m",
    "xtask": "the cross-task consistency terms",
    "dense.depth_kind": "true for inverse_depth, false for depth",
}
REMOVED: dict[str, str] = {
    "student": "pass the student with 'unirep evaluate --student PATH'",
    "teachers.train.selection_metric": "teachers select on their task's main metric",
    "teachers.finetune_train.selection_metric": "teachers select on their task's main metric",
}
"""Keys of unirep 0.3 that have no place in 0.4, and what to do instead."""


def moved(key: str) -> str | None:
    """Where the 0.3 key ``key`` went, in one line; None when it is simply unknown."""
    if key in REMOVED:
        return f"config key {key!r} was removed in unirep 0.4: {REMOVED[key]}"
    for old, new in MOVED.items():
        if key == old or key.startswith(f"{old}."):
            note = f" ({_NOTES[old]})" if old in _NOTES else ""
            return (
                f"config key {key!r} moved to {new + key[len(old) :]!r} in unirep 0.4{note}; "
                "see docs/changes.md"
            )
    targets = sorted({new.split(".")[0] for old, new in MOVED.items() if old.startswith(f"{key}.")})
    if targets:
        return (
            f"config key {key!r}: this section's keys moved to {', '.join(targets)!s} in unirep "
            "0.4; see docs/changes.md"
        )
    return None


# --------------------------------------------------------------------------------------------
# YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (YAML keeps the last)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: YAML's own merge
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1}); "
                "YAML would keep only the last value: remove one"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """YAML ``text`` (from ``where``, named in messages), duplicate keys refused."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"config {where}: {err}") from None
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"config {where} is not valid YAML: {detail}") from None


def preset_names() -> list[str]:
    """Names of the presets shipped as package data."""
    folder = resources.files("unirep.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_text(preset_or_path: str) -> tuple[str, str]:
    """(the config's name, its text) for a preset name or a YAML path."""
    path = Path(preset_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            return path.stem, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    if preset_or_path not in preset_names():
        raise ConfigError(
            f"unknown preset {preset_or_path!r}; valid presets: {', '.join(preset_names())} "
            "(or a path to a .yaml file)"
        )
    text = (resources.files("unirep.config") / "presets" / f"{preset_or_path}.yaml").read_text()
    return preset_or_path, text


def read_yaml(preset_or_path: str, chain: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """(name, values) of a preset or YAML file, with its ``base:`` chain merged under it."""
    if preset_or_path in chain:
        loop = " -> ".join([*chain, preset_or_path])
        raise ConfigError(f"config {chain[0]!r}: its 'base' chain loops ({loop})")
    name, text = _preset_text(preset_or_path)
    values = parse_yaml(text, repr(preset_or_path)) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config {preset_or_path!r} must be a mapping at the top level")
    base = values.pop("base", None)
    if base is not None:  # a preset written as changes to another preset
        if not isinstance(base, str):
            raise ConfigError(f"config {preset_or_path!r}: 'base' must name a preset or file")
        _, inherited = read_yaml(base, (*chain, preset_or_path))
        inherited.pop("preset", None)
        values = merge(inherited, values)
    return name, values


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` over ``base``, recursively for nested mappings."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(values: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``1e-3``, ``[a, b]``)."""
    if "=" not in override:
        raise ConfigError(
            f"override {override!r} must look like key=value (e.g. train.max_steps=5)"
        )
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = parse_yaml(raw, f"override {override!r}") if raw.strip() else ""
    except ConfigError:
        value = raw
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str):  # a Spec written as its bare name
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _one_kind(values: dict[str, Any], name: str, dense_preset: bool = True) -> None:
    """A run is classification or dense: refuse the keys of one kind beside a section of the
    other (``dense_preset``: the preset itself is dense, so its classification keys are wrong;
    else the overrides added dense keys to a classification preset)."""
    dense = values.get("dense")
    if not isinstance(dense, dict):
        return
    if not dense_preset:
        keys = [f"dense.{k}" for k in flatten(dense)] or ["dense"]
        raise ConfigError(
            f"config key {keys[0]!r} applies to dense runs only, and {name!r} is a "
            "classification run; choose a dense preset (e.g. --config mini-scenes) or remove it"
        )
    if not isinstance(values.get("classification"), dict):
        return
    keys = [f"classification.{k}" for k in values["classification"]] or ["classification"]
    raise ConfigError(
        f"config key {keys[0]!r} does not apply to dense runs ({name!r} sets a 'dense' "
        "section); a dense run's network, images and losses are set under 'dense': remove it"
    )


def from_dict(values: dict[str, Any]) -> Config:
    """A :class:`Config` bound from plain data (a saved ``config.yaml``, a preset's values)."""
    _one_kind(values, str(values.get("preset", "the config")))
    return bind(Config, values, moved=moved)


def read_config(preset_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a preset name or YAML path (default ``mini-decathlon``) and apply overrides.

    Keys, types, choices and ranges are checked here; what needs the registries or the data by
    :func:`unirep.pipeline.validate.load_config`, the entry point the commands use.
    """
    name, values = read_yaml(preset_or_path or DEFAULT_PRESET)
    values.setdefault("preset", name)
    dense_preset = isinstance(values.get("dense"), dict)
    for override in overrides or []:
        apply_override(values, override)
    _one_kind(values, name, dense_preset)
    return from_dict(values)


def with_origin(message: str, preset_or_path: str | None, overrides: Sequence[str]) -> str:
    """``message`` (a :class:`ConfigError` naming ``config key '<key>'``) saying where the value
    came from when the user did not write it: the preset (or file) set it, so the fix is an
    override, not the command line they typed."""
    found = re.match(r"config key '([^']+)'", message)
    if found is None:
        return message
    key = found.group(1)
    given = [o.split("=", 1)[0].strip() for o in overrides if "=" in o]
    if any(_related(key, g) for g in given):
        return message
    name = preset_or_path or DEFAULT_PRESET
    try:
        _, values = read_yaml(name)
    except ConfigError:
        return message
    if not any(_related(key, k) for k in flatten(values)):
        return message  # a default of the schema
    return f"{message} (the value comes from {name!r}: override it, e.g. {key}=...)"


def _related(a: str, b: str) -> bool:
    """Whether dotted keys ``a`` and ``b`` are the same key or one holds the other."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain, YAML-serialisable data."""
    return dataclasses.asdict(cfg)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for nested mappings with string keys (an empty mapping is a value of
    its own): a config as dotted keys, as overrides name them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def save_config(cfg: Config, path: Path) -> None:
    """Write the fully resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def cache_dir(cfg: Config) -> Path:
    """Where generated data, computed statistics and default teachers live."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    env = os.environ.get("UNIREP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "unirep"
