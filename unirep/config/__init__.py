"""Configuration: the typed schema (dataclasses), YAML presets (``presets/``), ``key=value``
overrides and the generic binder that checks keys, types and values."""

from unirep.config.schema import (
    Config,
    ConfigError,
    Spec,
    cache_dir,
    flatten,
    from_dict,
    preset_names,
    read_config,
    save_config,
    to_dict,
)

__all__ = [
    "Config",
    "ConfigError",
    "Spec",
    "cache_dir",
    "flatten",
    "from_dict",
    "preset_names",
    "read_config",
    "save_config",
    "to_dict",
]
