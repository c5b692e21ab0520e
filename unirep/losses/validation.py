"""The config rules the losses own: every loss named in its registry with arguments its builder
takes (then built once, so it refuses its own values), a loss fitting its task's kind, and the
cross-task and joint terms' task rules."""

from __future__ import annotations

from unirep.config.binder import bind_spec, trial
from unirep.config.schema import Config, Spec
from unirep.errors import ConfigError
from unirep.losses import FEATURE_LOSSES, PREDICTION_LOSSES, TASK_LOSSES
from unirep.registry import Registry
from unirep.tasks import TASK_KINDS


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, for a loss term that cannot work."""
    _check_loss(FEATURE_LOSSES, cfg.distill.feature_loss, "distill.feature_loss")
    if cfg.classification is not None:
        kind, is_kind = "classification", "every domain is a classification task"
        spec = cfg.classification
        _check_loss(TASK_LOSSES, spec.task_loss, "classification.task_loss", kind, is_kind)
        _check_loss(PREDICTION_LOSSES, spec.prediction_loss, "classification.prediction_loss",
                    kind, is_kind)  # fmt: skip
        return
    assert cfg.dense is not None
    for task, spec in cfg.dense.tasks.items():
        kind = spec.kind or task  # None: the name is the kind
        prefix, is_kind = f"dense.tasks.{task}", f"{task!r} is a {kind} task"
        _check_loss(TASK_LOSSES, spec.loss, f"{prefix}.loss", kind, is_kind)
        if spec.prediction_loss is not None:
            _check_loss(PREDICTION_LOSSES, spec.prediction_loss, f"{prefix}.prediction_loss",
                        kind, is_kind)  # fmt: skip
    tasks = list(cfg.dense.tasks)
    if cfg.dense.partial.method == "mtpsl" and len(tasks) < 2:
        raise ConfigError(
            "config key 'dense.partial.method': mtpsl maps between tasks; it needs 2+"
        )
    _check_transfer(cfg, tasks)
    _check_saliency(cfg, tasks)


def _check_loss(
    registry: Registry, spec: Spec, key: str, kind: str | None = None, is_kind: str = ""
) -> None:
    """A loss's name and arguments, the loss built once, and its fit to the task's ``kind``.

    A loss belongs to the kinds whose default it is or whose name prefixes its own
    (``depth_berhu`` is a depth loss); a loss that belongs to other kinds only is refused. A
    loss no kind claims fits every kind.
    """
    bind_spec(registry, spec, key)
    trial(f"{key}.kwargs", lambda: registry.build(spec.name, **spec.kwargs))
    if kind is None:
        return
    default_attr = "default_loss" if registry is TASK_LOSSES else "default_prediction_loss"
    owners: dict[str, set[str]] = {}
    for name in TASK_KINDS.names():
        default = getattr(TASK_KINDS.get(name), default_attr)
        for loss in registry.names():
            if loss == default or loss.startswith(f"{name}_"):
                owners.setdefault(loss, set()).add(name)
    if spec.name in owners and kind not in owners[spec.name]:
        valid = [n for n in registry.names() if kind in owners.get(n, {kind})]
        raise ConfigError(
            f"config key '{key}.name': {spec.name!r} is a {registry.kind} for "
            f"{' / '.join(sorted(owners[spec.name]))} tasks, but {is_kind}; "
            f"valid for {kind}: {', '.join(valid)}"
        )


def _check_transfer(cfg: Config, tasks: list[str]) -> None:
    """Cross-task consistency terms: 2+ tasks; pairs of two different tasks of the run."""
    assert cfg.dense is not None
    x = cfg.dense.transfer
    if x.active() and len(tasks) < 2:
        raise ConfigError("config key 'dense.transfer': cross-task terms need 2+ dense tasks")
    pairs = [tuple(p) for p in x.pairs] if x.pairs is not None else None
    for pair in pairs or []:
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(tasks):
            raise ConfigError(
                f"config key 'dense.transfer.pairs': {list(pair)!r} is not an ordered pair of "
                f"two different tasks of this run ({', '.join(tasks)})"
            )
    if pairs is not None and len(set(pairs)) != len(pairs):
        raise ConfigError("config key 'dense.transfer.pairs': a pair appears twice")
    if pairs is not None and not pairs:
        raise ConfigError("config key 'dense.transfer.pairs': empty; leave it null for every pair")
    if x.cycle.weight > 0 and pairs is not None and not any((b, a) in pairs for a, b in pairs):
        raise ConfigError(
            "config key 'dense.transfer.cycle.weight': a cycle a→b→a needs both (a, b) and "
            "(b, a) in dense.transfer.pairs"
        )


def _check_saliency(cfg: Config, tasks: list[str]) -> None:
    """SRDML: 2+ tasks, a floor the pairs can all have, and a student whose outputs give each
    task its own view of the shared encoder (no cross-task attention, no learned sharing)."""
    assert cfg.dense is not None
    s = cfg.dense.saliency
    if s is None or s.weight == 0:
        return
    if len(tasks) < 2:
        raise ConfigError("config key 'dense.saliency': task relations need 2+ dense tasks")
    pairs = len(tasks) * (len(tasks) - 1) // 2
    if s.floor * pairs > 1 + 1e-9:
        raise ConfigError(
            f"config key 'dense.saliency.floor': {s.floor} leaves no relation for {pairs} task "
            f"pairs; valid: a number in [0, {1 / pairs:.6g}] (1/pairs)"
        )
    for key, spec in (("cross_task", cfg.dense.cross_task), ("sharing", cfg.dense.sharing)):
        if spec is not None:
            raise ConfigError(
                f"config key 'dense.saliency': needs each task's own view of one shared encoder, "
                f"which a student with dense.{key}={spec.name} does not give; valid: "
                f"dense.{key}=null, or dense.saliency=null"
            )
