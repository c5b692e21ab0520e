"""Config schema: presets load and build; bad keys, types and names fail early and name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from unirep.config import Config, ConfigError, apply_override, load_config, preset_names
from unirep.models.network import build_network
from unirep.objective import build_objective


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_and_builds(preset: str) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.preset == preset
    net = build_network(
        cfg.model.backbone,
        cfg.model.backbone_kwargs,
        {"a": 3, "b": 5},
        adapter=cfg.model.adapter.name,
        adapter_kwargs=cfg.model.adapter.kwargs,
    )
    assert set(net.heads) == {"a", "b"} and set(net.adapters) == {"a", "b"}
    objective = build_objective(cfg.distill, distill=True)
    assert objective.needs_teachers


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
            "data.domains=[a, b]",
        ],
    )
    assert cfg.train.max_steps == 7
    assert cfg.distill.lambda_feature == {"objects": 10.0}
    assert cfg.train.optim.optimizer.kwargs["lr"] == pytest.approx(1e-3)
    assert cfg.distill.feature_loss.name == "l2"
    assert cfg.data.domains == ["a", "b"]


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
        ("distill.prediction_loss=kll", ["kll", "kl"]),
        ("model.adapter=big", ["model.adapter.name", "linear"]),
        ("model.backbone=not_a_net", ["model.backbone", "not_a_net", "timm"]),
        ("train.optim.optimizer=sgdd", ["train.optim.optimizer.name", "sgd", "adam"]),
        ("train.optim.scheduler=cos", ["scheduler", "cosine"]),
        ("data.source=imagenet", ["data.source", "decathlon", "synthetic-decathlon"]),
        ("split=testing", ["split", "test", "val"]),
        ("data.on_corrupt=ignore", ["data.on_corrupt", "skip"]),
        ("data.crop=64", ["data.crop", "data.resize"]),
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


def test_delta_m_selection_is_for_dense_runs_only() -> None:
    with pytest.raises(ConfigError, match=r"'delta_m' is for dense runs"):
        load_config("mini-decathlon", ["train.selection_metric=delta_m"])
    assert load_config("mini-scenes").train.selection_metric == "delta_m"
