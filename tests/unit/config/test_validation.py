"""Every bad value is refused at start-up, naming its key; no traceback reaches the user.

The unit test runs :func:`unirep.pipeline.validate.load_config` over many bad values; the
data-dependent checks (:func:`unirep.data.validation.check_against_data`) run on small stand-ins
for the run's data and once on the tiny generated benchmark; one script run shows the user sees a
single line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unirep.config.schema import Config, DenseConfig, DenseTaskConfig, Spec
from unirep.data import validation
from unirep.data.validation import check_against_data
from unirep.errors import ConfigError
from unirep.pipeline.validate import load_config

ROOT = Path(__file__).resolve().parents[3]

DENSE = "mini-scenes"

BAD: list[tuple[str | None, list[str], str]] = [
    # intervals, lengths and counts of every training recipe
    (None, ["train.eval_every=0"], "train.eval_every"),
    (None, ["train.checkpoint_every=-1"], "train.checkpoint_every"),
    (None, ["train.log_every=0"], "train.log_every"),
    (None, ["train.max_steps=-5"], "train.max_steps"),
    (None, ["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps"),
    (None, ["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (None, ["train.grad_clip=-1.0"], "train.grad_clip"),
    (None, ["train.grad_clip=.nan"], "train.grad_clip"),
    (None, ["train.on_nonfinite=ignore"], "train.on_nonfinite"),
    (None, ["teachers.train.eval_every=0"], "teachers.train.eval_every"),
    (None, ["teachers.train.on_nonfinite=retry"], "teachers.train.on_nonfinite"),
    (
        None,
        ["classification.finetune_train.log_every=0"],
        "classification.finetune_train.log_every",
    ),
    (
        None,
        ["classification.finetune_train.keep_checkpoints=-2"],
        "classification.finetune_train.keep",
    ),
    # data sizes
    (None, ["data.batch_size=0"], "data.batch_size"),
    (None, ["classification.batch_sizes={objects: 0}"], "classification.batch_sizes.objects"),
    (None, ["data.eval_batch_size=-1"], "data.eval_batch_size"),
    (None, ["data.num_workers=-1"], "data.num_workers"),
    (None, ["classification.resize=0"], "classification.resize"),
    (None, ["classification.crop=0"], "classification.crop"),
    (None, ["classification.crops={objects: 0}"], "classification.crops.objects"),
    (None, ["data.generator.image_size=0"], "data.generator.image_size"),
    (None, ["data.generator.scale=-1.0"], "data.generator.scale"),
    (None, ["data.generator.sizee=3"], "data.generator.sizee"),
    (None, ["data.generator.image_size=2.5"], "data.generator.image_size"),
    # optimizers and schedules, against their builders
    (None, ["train.optim.optimizer.kwargs.lrr=0.1"], "train.optim.optimizer.kwargs.lrr"),
    (None, ["train.optim.optimizer.kwargs.lr=-0.1"], "train.optim.optimizer.kwargs.lr"),
    (None, ["train.optim.optimizer.kwargs.lr=.inf"], "train.optim.optimizer.kwargs.lr"),
    (None, ["train.optim.optimizer.kwargs.momentum=-0.5"], "optimizer.kwargs.momentum"),
    (None, ["train.optim.optimizer.kwargs.nesterov=1"], "optimizer.kwargs.nesterov"),
    (
        None,
        ["train.optim.optimizer.kwargs={lr: 0.1, momentum: 0.0, nesterov: true}"],
        "train.optim.optimizer.kwargs",
    ),
    (None, ["train.adapter_optim.optimizer.kwargs.lr=0"], "train.adapter_optim.optimizer"),
    (None, ["train.adapter_optim.optimizer.kwargs.momentum=0.9"], "kwargs.momentum"),
    (None, ["teachers.train.optim.optimizer.kwargs.weight_decay=-1"], "teachers.train.optim"),
    (None, ["classification.finetune_train.optim.scheduler.kwargs.warmup=3"], "kwargs.warmup"),
    (None, ["train.optim.scheduler.kwargs.min_factor=-0.5"], "scheduler.kwargs.min_factor"),
    (None, ["train.optim.scheduler.kwargs.warmup_steps=-1"], "scheduler.kwargs.warmup_steps"),
    (
        None,
        ["train.optim.scheduler={name: multistep, kwargs: {gamma: -0.1}}"],
        "train.optim.scheduler.kwargs.gamma",
    ),
    (
        None,
        ["train.optim.scheduler={name: multistep, kwargs: {milestones: [0.5, -1]}}"],
        "train.optim.scheduler.kwargs.milestones",
    ),
    (None, ["train.optim.scheduler.kwargs.total_steps=5"], "kwargs.total_steps"),
    (None, ["classification.finetune_lr={digits: 0.0}"], "classification.finetune_lr.digits"),
    (None, ["classification.finetune_lr={objects: 0.1}"], "classification.finetune_lr.objects"),
    (
        None,
        ["classification.finetune_from=null", "classification.finetune_lr={digits: 0.1}"],
        "classification.finetune_lr",
    ),
    # weights, λs and scales
    (None, ["distill.lambda_feature={objects: -1}"], "distill.lambda_feature.objects"),
    (None, ["distill.lambda_prediction={objects: .inf}"], "distill.lambda_prediction.objects"),
    (None, ["distill.feature_scale=-1"], "distill.feature_scale"),
    (None, ["distill.prediction_scale=.nan"], "distill.prediction_scale"),
    (None, ["distill.default_lambda=-0.1"], "distill.default_lambda"),
    # losses: arguments, temperatures, kinds
    (
        None,
        ["classification.prediction_loss.kwargs.temperature=0"],
        "prediction_loss.kwargs.temperature",
    ),
    (None, ["classification.prediction_loss.kwargs.temperature=.nan"], "kwargs.temperature"),
    (
        None,
        ["classification.prediction_loss.kwargs.temp=2"],
        "classification.prediction_loss.kwargs.temp",
    ),
    (
        None,
        ["classification.task_loss.kwargs.label_smoothing=1.5"],
        "classification.task_loss.kwargs",
    ),
    (None, ["classification.task_loss=depth_l1"], "classification.task_loss.name"),
    (None, ["classification.prediction_loss=dense_l1"], "classification.prediction_loss.name"),
    (None, ["distill.feature_loss.kwargs.sigma_scale=0"], "distill.feature_loss.kwargs.sigma"),
    (None, ["distill.feature_loss.kwargs.normalise=true"], "distill.feature_loss.kwargs.norm"),
    # other components' arguments
    (
        None,
        ["classification.adapter={name: mlp, kwargs: {hidden_mult: 0}}"],
        "classification.adapter.kwargs",
    ),
    (None, ["classification.adapter.kwargs.in_dim=3"], "classification.adapter.kwargs.in_dim"),
    (None, ["weighting={name: uncertainty, kwargs: {inti: 1}}"], "weighting.kwargs.inti"),
    (None, ["weighting={name: pcgrad, kwargs: {seed: -1}}"], "weighting.kwargs.seed"),
    (None, ["weighting={name: pcgrad, kwargs: {seed: 1.5}}"], "weighting.kwargs.seed"),
    # the run as a whole, and tasks the run does not have
    (None, ["seed=-1"], "seed"),
    (None, ["overwrite=true", "resume=true"], "overwrite"),
    (None, ["cpu=true", "mixed_precision=fp16"], "mixed_precision"),
    (
        None,
        ["classification.domains=[digits, objects]", "classification.init_from_teacher=glyphs"],
        "init_from",
    ),
    (None, ["classification.domains=[digits, textures]"], "classification.finetune_from"),
    # dense runs
    (DENSE, ["dense.decoder_channels=0"], "dense.decoder_channels"),
    (DENSE, ["dense.num_classes=0"], "dense.num_classes"),
    (DENSE, ["dense.val_folder=null", "dense.val_fraction=1.5"], "dense.val_fraction"),
    (DENSE, ["dense.scales=[0]"], "dense.scales"),
    (DENSE, ["dense.scales=[.nan]"], "dense.scales"),
    (DENSE, ["dense.tasks.depth.weight=-1"], "dense.tasks.depth.weight"),
    (DENSE, ["dense.tasks.semantic.weight=.inf"], "dense.tasks.semantic.weight"),
    (DENSE, ["dense.tasks.depth.loss=cross_entropy"], "dense.tasks.depth.loss.name"),
    (DENSE, ["dense.tasks.semantic.loss=depth_l1"], "dense.tasks.semantic.loss.name"),
    (DENSE, ["dense.tasks.normal.loss=depth_berhu"], "dense.tasks.normal.loss.name"),
    (DENSE, ["dense.tasks.depth.prediction_loss=kl"], "dense.tasks.depth.prediction_loss"),
    (DENSE, ["dense.tasks.semantic.prediction_loss=dense_l1"], "semantic.prediction_loss"),
    (
        DENSE,
        ["dense.tasks.semantic.prediction_loss.kwargs.temperature=-2"],
        "dense.tasks.semantic.prediction_loss.kwargs.temperature",
    ),
    (
        DENSE,
        ["dense.tasks.depth.loss={name: depth_berhu, kwargs: {threshold: 0}}"],
        "dense.tasks.depth.loss.kwargs.threshold",
    ),
    (DENSE, ["dense.tasks.depth.loss.kwargs.threshold=0.2"], "dense.tasks.depth.loss.kwargs"),
    (DENSE, ["distill.lambda_feature={semantics: 1.0}"], "distill.lambda_feature.semantics"),
    (DENSE, ["distill.lambda_prediction={edges: 1.0}"], "distill.lambda_prediction.edges"),
    (DENSE, ["dense.encoder.kwargs.width_mult=0"], "dense.encoder.kwargs.width_mult"),
    (DENSE, ["dense.encoder.kwargs.depth=3"], "dense.encoder.kwargs.depth"),
    (DENSE, ["dense.encoder={name: timm}"], "dense.encoder.kwargs"),
    (DENSE, ["dense.cross_task={name: densemtl, kwargs: {heads: 0}}"], "cross_task.kwargs.heads"),
    (DENSE, ["dense.cross_task={name: mtan, kwargs: {channels: [1]}}"], "kwargs.channels"),
    (DENSE, ["data.generator.height=0"], "data.generator.height"),
    (DENSE, ["data.generator.size=3"], "data.generator.size"),
    (DENSE, ["teachers.train.optim.optimizer.kwargs.lr=.nan"], "teachers.train.optim.optimizer"),
    (DENSE, ["teachers.train.gradient_accumulation_steps=0"], "teachers.train.gradient"),
]


@pytest.mark.parametrize(("preset", "overrides", "key"), BAD, ids=[" ".join(b[1]) for b in BAD])
def test_bad_value_is_refused_naming_the_key(
    preset: str | None, overrides: list[str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides)
    message = str(info.value)
    assert key in message, message
    assert "\n" not in message


def test_there_are_many_distinct_bad_values() -> None:
    assert len({(p, tuple(o)) for p, o, _ in BAD}) == len(BAD) >= 30


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        (None, ["mixed_precision=bf16", "cpu=true"]),
        (None, ["train.grad_clip=1.0", "train.on_nonfinite=skip",
                "teachers.train.on_nonfinite=skip"]),
        (None, ["train.optim.scheduler={name: multistep, kwargs: {milestones: [0.5]}}",
                "train.optim.scheduler.kwargs.gamma=0.5"]),
        (
            None,
            ["classification.domains=[objects, digits]", "distill.lambda_feature={glyphs: 2.0}"],
        ),
        (DENSE, ["dense.tasks={semantic: {loss: cross_entropy}, depth: {loss: depth_berhu}}"]),
        (DENSE, ["dense.encoder={name: timm, kwargs: {model_name: resnet10t, drop_rate: 0.1}}"]),
        (DENSE, ["dense.cross_task={name: densemtl, kwargs: {pool: 4, heads: 2}}"]),
        (DENSE, ["weighting={name: uncertainty, kwargs: {init: -0.5}}"]),
    ],
)  # fmt: skip
def test_good_values_pass(preset: str | None, overrides: list[str]) -> None:
    load_config(preset, overrides)


# --------------------------------------------------------------------------------------------
# Against the data


class FakeData:
    """What :func:`check_against_data` reads of a :class:`~unirep.data.streams.RunData`."""

    def __init__(self, sizes: dict[str, int], batch_sizes: dict[str, int], tasks: list[str]):
        self.sizes, self._batch_sizes, self._tasks = sizes, batch_sizes, tasks

    def tasks(self) -> dict[str, object]:
        return dict.fromkeys(self._tasks)

    def batch_sizes(self) -> dict[str, int]:
        return dict(self._batch_sizes)

    def datasets(self, split: str, train: bool = False) -> dict[str, list[int]]:
        assert split == "train" and train
        return {stream: list(range(n)) for stream, n in self.sizes.items()}


def _classification(**data: object) -> Config:
    cfg = Config()
    for key, value in data.items():
        section = cfg.classification if hasattr(cfg.classification, key) else cfg.data
        setattr(section, key, value)
    return cfg


def test_data_that_fits_passes() -> None:
    cfg = _classification(batch_size=4, batch_sizes={"b": 8})
    check_against_data(cfg, FakeData({"a": 4, "b": 9}, {"a": 4, "b": 8}, ["a", "b"]))  # type: ignore[arg-type]
    two = FakeData({"a": 8, "b": 8}, {"a": 4, "b": 4}, ["a", "b"])
    check_against_data(cfg, two, world_size=2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cfg", "data", "world_size", "needles"),
    [
        (_classification(batch_size=32), FakeData({"a": 10}, {"a": 32}, ["a"]), 1,
         ["'data.batch_size'", "32", "10 training samples of 'a'", "at most 10"]),
        (_classification(batch_sizes={"b": 8}), FakeData({"a": 99, "b": 5}, {"a": 4, "b": 8},
         ["a", "b"]), 1, ["'classification.batch_sizes.b'", "8", "5 training samples"]),
        (_classification(batch_size=4), FakeData({"a": 6}, {"a": 4}, ["a"]), 2,
         ["'data.batch_size'", "× 2 processes", "at most 3"]),
    ],
)  # fmt: skip
def test_batch_larger_than_the_training_split_is_refused(
    cfg: Config, data: FakeData, world_size: int, needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        check_against_data(cfg, data, world_size)  # type: ignore[arg-type]
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_dense_batch_is_data_batch_size() -> None:
    cfg = Config(dense=DenseConfig(tasks={"depth": DenseTaskConfig(Spec("depth_l1"))}))
    cfg.data.batch_size = 8
    with pytest.raises(ConfigError, match=r"'data\.batch_size'.*4 training samples of 'images'"):
        check_against_data(cfg, FakeData({"images": 4}, {"images": 8}, ["depth"]))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lambda_feature", {"c": 1.0}),
        ("lambda_prediction", {"c": 1.0}),
    ],
)
def test_every_domain_run_refuses_keys_naming_other_tasks(key: str, value: object) -> None:
    cfg = Config()
    setattr(cfg.distill, key, value)
    with pytest.raises(ConfigError, match=rf"'distill\.{key}\.c'.*valid: a, b"):
        check_against_data(cfg, FakeData({"a": 9, "b": 9}, {"a": 2, "b": 2}, ["a", "b"]))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("batch_sizes", {"c": 2}, "classification.batch_sizes.c"),
        ("crops", {"c": 16}, "classification.crops.c"),
        ("no_flip", ["c"], "classification.no_flip"),
        ("square_resize", ["c"], "classification.square_resize"),
    ],
)
def test_every_domain_run_refuses_data_keys_naming_other_domains(
    field: str, value: object, key: str
) -> None:
    cfg = _classification(**{field: value})
    with pytest.raises(ConfigError, match=rf"'{key}'.*'c' is not a task"):
        check_against_data(cfg, FakeData({"a": 9}, {"a": 2}, ["a"]))  # type: ignore[arg-type]


def test_teacher_keys_must_name_a_task_of_the_run() -> None:
    cfg = Config()
    assert cfg.classification is not None
    cfg.classification.finetune_from = "c"
    with pytest.raises(ConfigError, match=r"'classification\.finetune_from'.*valid: a"):
        check_against_data(cfg, FakeData({"a": 9}, {"a": 2}, ["a"]))  # type: ignore[arg-type]


def test_picked_domains_may_set_other_domains_of_the_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(validation, "_source_domains", lambda cfg: ["a", "b"])
    cfg = _classification(domains=["a"], no_flip=["b"])
    cfg.distill.lambda_feature = {"b": 2.0}
    data = FakeData({"a": 9}, {"a": 2}, ["a"])
    check_against_data(cfg, data)  # type: ignore[arg-type]
    cfg.distill.lambda_feature = {"bb": 2.0}
    with pytest.raises(ConfigError, match=r"'distill\.lambda_feature\.bb'.*valid: a, b"):
        check_against_data(cfg, data)  # type: ignore[arg-type]


def test_resolve_data_checks_the_generated_benchmark(tiny_cache: Path, tmp_path: Path) -> None:
    from tests.conftest import tiny_config
    from unirep.pipeline.rundir import make_accelerator
    from unirep.pipeline.stage_two import resolve_data

    cfg = tiny_config(tiny_cache, tmp_path, "classification.batch_sizes={textures: 100000}")
    with pytest.raises(ConfigError, match=r"'classification\.batch_sizes\.textures'.*100000"):
        resolve_data(cfg, make_accelerator(cfg))
    # the generated benchmark's domains are known from the config: a typo fails before any data
    with pytest.raises(ConfigError, match=r"'distill\.lambda_feature\.glyph'.*glyphs"):
        tiny_config(tiny_cache, tmp_path, "distill.lambda_feature={glyph: 2.0}")


# --------------------------------------------------------------------------------------------
# What the user sees


def test_script_prints_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill.py"),
         "train.optim.optimizer.kwargs.lrr=0.1", f"output_dir={out}",
         f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "train.optim.optimizer.kwargs.lrr" in lines[0] and "lr" in lines[0]
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("{name: grouped_uncertainty, kwargs: {groups: [[semantic, dept]]}}", "dept"),
        ("{name: rlw, kwargs: {distribution: foo}}", "distribution"),
        ("{name: cagrad, kwargs: {c: -1}}", "cagrad c"),
        ("{name: nash_mtl, kwargs: {update_weights_every: 0}}", "update_weights_every"),
        ("{name: imtl, kwargs: {mode: x}}", "imtl mode"),
        ("{name: static, kwargs: {weights: {semantic: -1}}}", "semantic"),
        ("{name: mgda, kwargs: {scale: big}}", "scale"),
        ("{name: aligned_mtl, kwargs: {scale_mode: foo}}", "scale_mode"),
    ],
)
def test_a_weighting_refuses_its_arguments_at_start_up(setting: str, message: str) -> None:
    """The weighting is built for the run's tasks while the config is checked: its own refusal
    is one line naming ``weighting.kwargs``, before any data or training."""
    with pytest.raises(ConfigError, match=rf"config key 'weighting\.kwargs': .*{message}"):
        load_config("mini-scenes", [f"weighting={setting}"])
