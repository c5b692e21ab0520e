"""Config schema: presets load and build; bad keys, types and names fail early and name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unirep.config.load import apply_override, preset_names, save_config, to_dict
from unirep.config.schema import Config, Spec
from unirep.errors import ConfigError
from unirep.pipeline.validate import load_config
from unirep.weighting import WEIGHTINGS


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads(preset: str) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.preset == preset


def _preset_tasks(cfg: Config) -> dict:
    """The tasks the run's data would give, through the real config → task mapping, for two
    made-up domains (classification) or the dense tasks of the preset (no data is read)."""
    from types import SimpleNamespace

    from unirep.data.streams import DomainStreams, SceneStreams

    if cfg.dense is not None:
        dense = SimpleNamespace(
            root=Path("."), tasks=list(cfg.dense.tasks), num_classes=cfg.dense.num_classes,
            class_names=None,
        )  # fmt: skip
        return SceneStreams(dense, cfg).tasks()  # type: ignore[arg-type]
    classes = {"a": 3, "b": 5}
    domains = SimpleNamespace(
        root=Path("."),
        domains=list(classes),
        dataset=lambda d, split: SimpleNamespace(num_classes=classes[d], class_names=None),
    )
    return DomainStreams(domains, cfg).tasks()  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_and_builds(preset: str) -> None:
    # imported here: the config tests above do not need the builders
    from unirep.models.build import architecture, build_network
    from unirep.objective import Objective
    from unirep.training.trainable import TrainableModule
    from unirep.weighting import build_weighting

    cfg = load_config(preset)
    tasks = _preset_tasks(cfg)
    expected = set(cfg.dense.tasks) if cfg.dense is not None else {"a", "b"}
    assert set(tasks) == expected
    teachers = {t: build_network(architecture(cfg), {t: task}) for t, task in tasks.items()}
    net = build_network(architecture(cfg, student=True), tasks)
    assert set(net.tasks) == expected
    spec = cfg.classification.adapter if cfg.classification is not None else Spec("linear")
    aligners = net.build_aligners(
        {t: teacher.feature_dim for t, teacher in teachers.items()}, spec.name, **spec.kwargs
    )
    assert set(aligners) == expected
    objective = Objective(tasks, cfg.distill)
    assert objective.needs_teachers
    weighting = build_weighting(cfg.weighting.name, list(tasks), **cfg.weighting.kwargs)
    main, adapters = TrainableModule(net, objective, weighting, aligners).parameter_groups()
    assert main and adapters


def test_default_is_mini_decathlon() -> None:
    assert load_config().preset == "mini-decathlon"


def test_overrides_are_typed_yaml() -> None:
    cfg = load_config(
        None,
        [
            "train.max_steps=7",
            "distill.lambda_feature={objects: 10}",
            "train.optim.optimizer.kwargs.lr=1e-3",
            "distill.feature_loss=l2",
            "classification.domains=[objects, digits]",
        ],
    )
    assert cfg.train.max_steps == 7
    assert cfg.distill.lambda_feature == {"objects": 10.0}
    assert cfg.train.optim.optimizer.kwargs["lr"] == pytest.approx(1e-3)
    assert cfg.distill.feature_loss.name == "l2"
    assert cfg.classification is not None
    assert cfg.classification.domains == ["objects", "digits"]


def test_override_into_bare_spec_name() -> None:
    values = {"distill": {"feature_loss": "cka_rbf"}}
    apply_override(values, "distill.feature_loss.kwargs.sigma_scale=2")
    assert values["distill"]["feature_loss"] == {"name": "cka_rbf", "kwargs": {"sigma_scale": 2}}


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.max_stepz=3", ["train.max_stepz", "max_steps"]),
        ("bogus=1", ["bogus", "valid keys"]),
        ("train.max_steps=many", ["train.max_steps", "integer", "many"]),
        ("baseline=maybe", ["baseline", "true or false"]),
        ("distill.feature_loss=ckaa", ["distill.feature_loss.name", "ckaa", "cka_rbf", "l2"]),
        ("classification.prediction_loss=kll", ["kll", "kl"]),
        ("classification.adapter=big", ["classification.adapter.name", "linear"]),
        ("classification.backbone=not_a_net", ["classification.backbone", "not_a_net", "timm"]),
        ("train.optim.optimizer=sgdd", ["train.optim.optimizer.name", "sgd", "adam"]),
        ("train.optim.scheduler=cos", ["scheduler", "cosine"]),
        ("data.source=imagenet", ["data.source", "decathlon", "synthetic-decathlon"]),
        ("split=testing", ["split", "test", "val"]),
        ("data.on_corrupt=ignore", ["data.on_corrupt", "skip"]),
        ("classification.crop=64", ["classification.crop", "classification.resize"]),
        ("train.max_steps=0", ["train.max_steps", "positive"]),
        ("noequals", ["key=value"]),
    ],
)
def test_bad_config_names_the_key(override: str, needles: list[str]) -> None:
    with pytest.raises((ConfigError, KeyError)) as info:
        load_config(None, [override])
    message = str(info.value)
    for needle in needles:
        assert needle in message, message


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="mini-decathlon"):
        load_config("no-such-preset")


def test_yaml_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  max_steps: 11\n")
    cfg = load_config(str(path))
    assert cfg.train.max_steps == 11 and cfg.preset == "mine"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(str(path))


def test_selection_metric_is_a_classification_choice_and_delta_m_for_dense_runs() -> None:
    assert load_config("mini-decathlon").selection_metric == "accuracy"
    cfg = load_config("mini-decathlon", ["classification.selection_metric=delta_m"])
    assert cfg.selection_metric == "delta_m"
    with pytest.raises(ConfigError, match=r"'classification\.selection_metric'.*accuracy, delta_m"):
        load_config("mini-decathlon", ["classification.selection_metric=loss"])
    assert load_config("mini-scenes").selection_metric == "delta_m"
    with pytest.raises(ConfigError, match="dense runs always select on delta_m"):
        load_config("mini-scenes", ["train.selection_metric=accuracy"])


@pytest.mark.parametrize("preset", preset_names())
def test_saved_config_of_every_preset_loads_again(preset: str, tmp_path: Path) -> None:
    cfg = load_config(preset)
    path = tmp_path / "config.yaml"  # what every run writes next to its checkpoints
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)
    again = load_config(str(path))
    assert to_dict(again) == to_dict(cfg)


# --------------------------------------------------------------------------------------------
# weighting: the task-balancing method, {name, kwargs} like every other choice


def test_weighting_defaults_to_sum_and_takes_a_bare_name() -> None:
    assert load_config().weighting == Spec("sum")
    assert load_config(None, ["weighting=uncertainty"]).weighting == Spec("uncertainty")
    dense = load_config("mini-scenes", ["weighting=pcgrad"])
    assert dense.weighting == Spec("pcgrad")


def test_weighting_with_kwargs(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("base: mini-scenes\nweighting: {name: uncertainty, kwargs: {init: 0.5}}\n")
    assert load_config(str(path)).weighting == Spec("uncertainty", {"init": 0.5})
    cfg = load_config(None, ["weighting=pcgrad", "weighting.kwargs.seed=3"])
    assert cfg.weighting == Spec("pcgrad", {"seed": 3})


def test_unknown_weighting_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["weighting=gradvacc"])
    message = str(info.value)
    assert "weighting.name" in message and "gradvacc" in message
    assert WEIGHTINGS.names() and all(name in message for name in WEIGHTINGS.names())


# --------------------------------------------------------------------------------------------
# dense task kinds


def test_dense_task_kind_defaults_to_its_name() -> None:
    cfg = load_config("mini-scenes")
    assert cfg.dense is not None
    assert all(task.kind is None for task in cfg.dense.tasks.values())
    cfg = load_config(
        "mini-scenes",
        ["dense.tasks={seg: {loss: cross_entropy, kind: semantic}, depth: {loss: depth_l1}}"],
    )
    assert cfg.dense is not None and cfg.dense.tasks["seg"].kind == "semantic"


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("dense.tasks.depth.kind=disparity", ["dense.tasks.depth.kind", "disparity", "normal"]),
        ("dense.tasks.edges={loss: cross_entropy}", ["dense.tasks.edges", "kind", "semantic"]),
    ],
)
def test_bad_dense_task_kind_names_the_key(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("mini-scenes", [override])
    for needle in needles:
        assert needle in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------
# keys that do not apply to the run's kind


@pytest.mark.parametrize(
    "override",
    [
        "classification.backbone=resnet18",
        "classification.crop=16",
        "classification.task_loss=depth_l1",
        "classification.finetune_from=semantic",
    ],
)
def test_classification_keys_are_refused_in_dense_runs(override: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("mini-scenes", [override])
    message = str(info.value)
    key = override.split("=")[0]
    assert f"{key!r} does not apply to dense runs" in message, message
    assert "remove it" in message


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("model.backbone=resnet18", "classification.backbone"),
        ("data.domains=[digits]", "classification.domains"),
        ("teachers.finetune_lr=0.1", "classification.finetune_lr"),
        ("partial.method=jtr", "dense.partial.method"),
        ("xtask.cycle.weight=1.0", "dense.transfer.cycle.weight"),
        ("dense.depth_kind=depth", "dense.inverse_depth"),
    ],
)
def test_keys_of_0_3_name_their_new_place(old: str, new: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("mini-scenes" if old.startswith(("partial", "xtask", "dense")) else None, [old])
    message = str(info.value)
    assert f"moved to {new!r}" in message and "unirep 0.4" in message, message


@pytest.mark.parametrize(
    ("preset", "kind", "key"),
    [
        ("mini-decathlon", "classification", "teachers.train.selection_metric"),
        ("mini-decathlon", "classification", "teachers.finetune_train.selection_metric"),
        ("mini-scenes", "dense", "teachers.train.selection_metric"),
    ],
)
def test_teacher_selection_metric_is_refused(preset: str, kind: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(preset, [f"{key}=delta_m"])
    message = str(info.value)
    assert f"'{key}' was removed in unirep 0.4" in message, message
    assert "teachers select on their task's main metric" in message, message
