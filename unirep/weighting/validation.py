"""The config rules the weightings own: the weighting named in its registry with arguments its
builder takes, built for the run's tasks (its own refusals: a negative weight, an unknown
distribution or group member, a missing optional solver), AdaTask's two halves together, and no
gradient accumulation for a weighting that steps once per task group."""

from __future__ import annotations

from unirep.config.binder import bind_spec, trial
from unirep.config.schema import Config
from unirep.errors import ConfigError
from unirep.weighting import WEIGHTINGS


def check_config(cfg: Config, tasks: list[str] | None = None) -> None:
    """Raise :class:`ConfigError`, naming the key, for a weighting that cannot work; with
    ``tasks`` (known from a dense config, or from the data) it is built for them."""
    bind_spec(WEIGHTINGS, cfg.weighting, "weighting", ("tasks",))
    if tasks is None and cfg.dense is not None:  # the tasks are known before the data is read
        tasks = list(cfg.dense.tasks)
    if tasks is not None:
        check_build(cfg, tasks)
    weighting, optimizer = cfg.weighting.name, cfg.train.optim.optimizer.name
    if (weighting == "adatask") != (optimizer == "adatask"):
        key, value, other = (
            ("train.optim.optimizer.name", optimizer, "weighting.name=adatask")
            if weighting == "adatask"
            else ("weighting.name", weighting, "train.optim.optimizer.name=adatask")
        )
        raise ConfigError(
            f"config key {key!r}: must be 'adatask' with {other} (the weighting hands the "
            f"per-task gradients to the optimizer), got {value!r}"
        )
    steps = cfg.train.gradient_accumulation_steps
    if cfg.weighting.kwargs.get("path") == "gramian" and steps != 1:
        raise ConfigError(
            f"config key 'weighting.kwargs.path': 'gramian' needs train.gradient_accumulation_steps"
            f" = 1 (the window's Gramian needs every micro-batch's gradients), got {steps!r}; use "
            "'auto' or 'jacobian'"
        )
    if getattr(WEIGHTINGS.get(weighting), "leaves_parameters_unused", False) and steps != 1:
        raise ConfigError(
            f"config key 'train.gradient_accumulation_steps': must be 1 with weighting "
            f"{weighting!r} (one optimizer step per task group and batch), got {steps!r}"
        )


def check_build(cfg: Config, tasks: list[str]) -> None:
    """The weighting built for ``tasks``: its own refusals stop the run before any work."""
    spec = cfg.weighting
    trial("weighting.kwargs", lambda: WEIGHTINGS.build(spec.name, tasks=tasks, **spec.kwargs))
