"""Configuration: the typed schema (:mod:`~unirep.config.schema`), YAML presets (``presets/``)
and ``key=value`` overrides (:mod:`~unirep.config.load`), bound by one generic binder
(:mod:`~unirep.config.binder`) that checks keys, types, choices and ranges."""

from unirep.config.load import (
    apply_override,
    cache_dir,
    flatten,
    from_dict,
    preset_names,
    read_config,
    save_config,
    to_dict,
)
from unirep.config.schema import (
    ClassificationConfig,
    Config,
    DataConfig,
    DenseConfig,
    DenseTaskConfig,
    DistillConfig,
    OptimConfig,
    PartialConfig,
    Spec,
    TeachersConfig,
    TrainConfig,
    TransferConfig,
)
from unirep.errors import ConfigError

__all__ = [
    "ClassificationConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DenseConfig",
    "DenseTaskConfig",
    "DistillConfig",
    "OptimConfig",
    "PartialConfig",
    "Spec",
    "TeachersConfig",
    "TrainConfig",
    "TransferConfig",
    "apply_override",
    "cache_dir",
    "flatten",
    "from_dict",
    "preset_names",
    "read_config",
    "save_config",
    "to_dict",
]
