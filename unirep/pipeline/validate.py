"""A command's config, read and checked once, before any data is read or model built.

:func:`load_config` (a preset or YAML path plus overrides) and :func:`resolve_config` (the same
from Python, also taking a :class:`Config`) bind the values to the schema, which checks keys,
types, choices and ranges (:mod:`unirep.config.binder`), then run each package's own rules:
the data's, the networks', the losses', the optimizers', the weighting's, the training loop's
and stage one's. What only the data can tell is checked by
:func:`unirep.data.validation.check_against_data` as soon as the data is resolved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unirep.config.load import apply_override, from_dict, read_config, to_dict, with_origin
from unirep.config.schema import Config
from unirep.data import validation as data_rules
from unirep.errors import ConfigError
from unirep.losses import validation as loss_rules
from unirep.models import validation as model_rules
from unirep.optim import validation as optim_rules
from unirep.stage_one import keys as stage_one_rules
from unirep.training import validation as training_rules
from unirep.weighting import validation as weighting_rules

RULES = (
    training_rules.check_config,
    data_rules.check_config,
    model_rules.check_config,
    loss_rules.check_config,
    optim_rules.check_config,
    weighting_rules.check_config,
    stage_one_rules.check_config,
)
"""Each package's cross-field and registry rules, in the order a user meets them."""


def validate(cfg: Config) -> None:
    """Raise :class:`~unirep.errors.ConfigError`, naming the key, for the first value that
    cannot work (the binder has checked keys, types, choices and ranges already)."""
    for rule in RULES:
        rule(cfg)


def load_config(preset_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a preset name or YAML path (default ``mini-decathlon``), apply overrides, validate."""
    cfg = read_config(preset_or_path, overrides)
    try:
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(with_origin(str(err), preset_or_path, overrides or [])) from None
    return cfg


def resolve_config(
    config: Config | str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """A checked config from Python: ``config`` is a :class:`Config`, a preset name or a YAML
    path (None: the default preset), with dotted ``key=value`` ``overrides`` applied, as
    ``--config`` and the overrides do on the command line. A :class:`Config` is copied, not
    changed. Bad keys, types and values raise :class:`~unirep.errors.ConfigError` naming the
    key."""
    if isinstance(config, Config):
        values = to_dict(config)
        for override in overrides:
            apply_override(values, override)
        cfg = from_dict(values)
    else:
        cfg = read_config(None if config is None else str(config), list(overrides))
    validate(cfg)
    return cfg
