"""Typed configuration: dataclasses are the schema, YAML presets are instances of it.

``read_config("mini-decathlon", ["train.max_steps=100"])`` reads a preset shipped in
``unirep/presets/`` (or a YAML path), applies dotted ``key=value`` overrides and checks every key
and type. Values, cross-field rules and registry names are checked in :mod:`unirep.pipeline.validate`,
whose ``load_config`` (read + validate) is what scripts call. Errors name the key, the value and
the valid choices.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from unirep.errors import UnirepError


class ConfigError(UnirepError, ValueError):
    """A config key, type or value is wrong; the message names it and what was expected."""


@dataclass
class Spec:
    """An interchangeable component: a registry name plus its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class HFDomainConfig:
    """A domain read with Hugging Face ``datasets`` (a local folder, or a Hub name when online)."""

    path: str
    config_name: str | None = None
    splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "val": "validation", "test": "test"}
    )  # unirep split -> the dataset's split name
    image_column: str = "image"
    label_column: str = "label"
    id_column: str | None = None


@dataclass
class DataConfig:
    """Where the domains come from and how they are read.

    ``source`` is a data-source registry name: ``synthetic-decathlon`` generates the embedded
    benchmark on first use; ``decathlon`` reads an existing Visual Decathlon tree at ``root``.
    """

    source: str = "synthetic-decathlon"
    root: str | None = None  # None: <cache_dir>/<source>-<seed> for generated sources
    cache_dir: str | None = None  # None: $UNIREP_CACHE or ~/.cache/unirep
    domains: list[str] = field(default_factory=list)  # empty: every domain the source has
    resize: int = 32  # shorter side after resizing
    crop: int = 28  # training / evaluation crop
    crops: dict[str, int] = field(default_factory=dict)  # per-domain crop (Decathlon: ImageNet 72)
    no_flip: list[str] = field(default_factory=list)  # domains where a flip changes the class
    square_resize: list[str] = field(default_factory=list)  # domains resized to resize x resize
    batch_size: int = 32  # per domain and per process, unless batch_sizes names the domain
    batch_sizes: dict[str, int] = field(default_factory=dict)
    eval_batch_size: int = 256
    num_workers: int = 0
    # decoded training-resolution samples kept in memory up to this size (MiB; 0: off); the
    # random augmentation is still drawn per sample: the same numbers (unirep.data.memory)
    memory_cache_mib: int = 0
    on_corrupt: str = "error"  # "error" or "skip"
    generator: dict[str, Any] = field(default_factory=dict)  # kwargs of the synthetic generator
    hf_domains: dict[str, HFDomainConfig] = field(default_factory=dict)  # extra domains


@dataclass
class ModelConfig:
    """The network shared by teachers and student: a backbone plus one linear head per domain."""

    backbone: str = "resnet_decathlon_tiny"  # a unirep backbone or any timm model name
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter: Spec = field(default_factory=lambda: Spec("linear"))
    residual_adapters: bool = False  # student only: parallel 1x1 adapters + per-domain BN (RA)


@dataclass
class OptimConfig:
    """An optimizer and its learning-rate schedule (schedule lengths are in optimizer steps)."""

    optimizer: Spec = field(default_factory=lambda: Spec("sgd", {"lr": 0.05, "momentum": 0.9}))
    scheduler: Spec = field(default_factory=lambda: Spec("cosine"))


@dataclass
class TrainConfig:
    """One training phase (teacher, baseline or student): length, evaluation and checkpoints."""

    max_steps: int = 300
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            Spec("adam", {"lr": 0.01, "weight_decay": 5e-4}), Spec("cosine")
        )
    )
    grad_clip: float | None = None
    gradient_accumulation_steps: int = 1
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the step
    # every N optimizer steps: per-task gradient cosines and per-layer task dominance of the
    # shared parameters (unirep.training.diagnostics; T extra backward passes on those steps); 0: off
    diagnostics_every: int = 0
    # speed only (the same maths, to float rounding; unirep.training.trainer.setup): the networks and
    # inputs in channels-last (NHWC) memory format; torch.compile of the student's forward (for
    # CUDA; on CPU it needs a C++ compiler, checked at start-up)
    channels_last: bool = False
    compile: bool = False
    # "accuracy" (mean over domains) for classification; "delta_m" (vs the teachers) for dense
    # students. Always on the validation split. Teachers always select on their task's main
    # metric, so teachers.train leaves it at its default (unirep.pipeline.validate refuses other values).
    selection_metric: str = "accuracy"


@dataclass
class DistillConfig:
    """The student's objective: task loss + λ_f·feature distillation + λ_p·prediction distillation.

    λ values are per domain (``lambda_feature`` / ``lambda_prediction`` entries), falling back to
    ``default_lambda``; ``annealing`` scales both over training (``linear``: 1 → 0, as in URL).
    """

    task_loss: Spec = field(default_factory=lambda: Spec("cross_entropy"))
    feature_loss: Spec = field(default_factory=lambda: Spec("cka_rbf"))
    prediction_loss: Spec = field(default_factory=lambda: Spec("kl", {"temperature": 4.0}))
    default_lambda: float = 1.0
    lambda_feature: dict[str, float] = field(default_factory=dict)
    lambda_prediction: dict[str, float] = field(default_factory=dict)
    feature_scale: float = 1.0  # global σ of URL
    prediction_scale: float = 1.0  # global β of URL
    annealing: str = "linear"
    init_from_teacher: str | None = None  # domain whose teacher backbone initialises the student
    enabled: bool = True  # false: the student trains without the teachers' losses (a variant)
    # CRD-style in-batch contrastive distillation (Tian et al. 2020), added to the feature term:
    # InfoNCE of the adapted student feature against the teachers' features of the batch
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1


OUTPUT_CACHE_DTYPES = ("float16", "float32")


@dataclass
class OutputCacheConfig:
    """The teacher-output cache (FKD, Shen & Xing, ECCV 2022; :mod:`unirep.teachers.output_cache`):
    ``draws`` pre-drawn augmentations per training sample and the teachers' outputs on them,
    computed once into ``<teacher_root>/outputs/`` and read by the student instead of running the
    teachers (0: the teachers run at every step), stored in ``dtype`` (float16 or float32)."""

    draws: int = 0
    dtype: str = "float16"


@dataclass
class TeachersConfig:
    """Stage one: one single-domain network per domain, trained when missing."""

    root: str | None = None  # None: <cache_dir>/teachers
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune_from: str | None = None  # domain whose teacher initialises the others (Decathlon)
    finetune_train: TrainConfig | None = None  # recipe for the fine-tuned teachers
    finetune_lr: dict[str, float] = field(default_factory=dict)  # per-domain lr of that recipe
    retrain: bool = False
    # how the frozen teachers run beside the student (unirep.teachers.batched): under autocast in
    # bf16 or fp16 (null: the run's mixed_precision), outputs cast back to float32; teachers of
    # one architecture and input shape evaluated as one vmapped call (the same outputs)
    autocast: str | None = None
    batched: bool = False
    output_cache: OutputCacheConfig = field(default_factory=OutputCacheConfig)


@dataclass
class DenseTaskConfig:
    """One dense task of a multi-task run: its supervised loss, weight and prediction distillation.

    ``loss`` is a task-loss registry name (``cross_entropy`` for ``semantic``, ``depth_l1`` or
    ``depth_berhu`` for ``depth``, ``normal_cosine`` for ``normal``). ``prediction_loss`` (optional)
    distils the teacher's prediction of this task: ``kl`` on segmentation logits, ``dense_l1`` on
    depth or normals; None leaves it out (URL's NYUv2 recipe has none). ``kind`` says what the
    task predicts (``semantic``, ``depth`` or ``normal``); None means the task's name is its kind.
    """

    loss: Spec
    weight: float = 1.0
    prediction_loss: Spec | None = None
    kind: str | None = None  # semantic, depth or normal; None: the task's name is its kind


@dataclass
class DenseConfig:
    """Multi-task dense prediction (NYUv2, Cityscapes, mini-scenes) in the MTAN file format.

    Setting this section makes a run dense: one teacher per task, then a multi-task student with
    a shared encoder, per-task decoders and heads, optional cross-task attention and URL's two
    alignment adapters per task. ``data.source`` is then ``mtan`` (a folder at ``data.root``) or
    ``mini-scenes`` (generated on first use with ``data.generator`` arguments).
    """

    tasks: dict[str, DenseTaskConfig] = field(default_factory=dict)  # semantic, depth, normal
    num_classes: int = 13  # semantic classes (NYUv2 13, Cityscapes 7 or 19, mini-scenes 7)
    label_dir: str = "label"  # Cityscapes: label_7 or label_19
    depth_kind: str = "depth"  # "depth" (metres) or "inverse_depth" (Cityscapes)
    scales: list[float] = field(default_factory=lambda: [1.0, 1.2, 1.5])  # MTAN scale-crop
    flip: bool = True
    augment: bool = True
    val_folder: str | None = None  # None: carve val_fraction of the training folder
    val_fraction: float = 0.1
    test_folder: str = "val"  # MTAN's "val" folder is the standard test set
    encoder: Spec = field(default_factory=lambda: Spec("segnet"))  # segnet or timm
    decoder_channels: int = 64
    cross_task: Spec | None = None  # mtan or densemtl (kwargs: reduction / pool, heads)


@dataclass
class MTPSLConfig:
    """MTPSL's pairwise joint task spaces (Li, Liu & Bilen, CVPR 2022): see
    :class:`unirep.losses.joint.MTPSLLoss`."""

    lambda_reg: float = 0.5  # the regulariser tying both mappings to the student's feature
    mode: str = "partial"  # "partial": (unlabelled s, labelled t) pairs; "full": every pair
    film_lr: float = 1e-3  # the FiLM γ/β learning rate (reference: NYUv2 1e-3, Cityscapes 1e-5)
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # mapping network stages


@dataclass
class JTRConfig:
    """JTR's joint-task regularisation (Nishi et al., CVPR 2024): see
    :class:`unirep.losses.joint.JTRLoss`."""

    distance_weight: float = 4.0
    reconstruction_weight: float = 2.0
    widths: list[int] = field(default_factory=lambda: [32, 64])  # encoder-decoder stages


@dataclass
class TermConfig:
    """One loss term: its weight (0: off) and a linear ramp-up from 0 over ``rampup_steps``."""

    weight: float = 0.0
    rampup_steps: int = 0


@dataclass
class CrossTaskConfig:
    """Cross-task alignment terms (Nakano, Chen & Demachi 2021): task-transfer networks
    ``T_{a→b}`` (small U-Nets) for every ordered pair of the run's tasks (or ``pairs``), trained
    with the student and dropped at export: see :class:`unirep.losses.transfer.CrossTaskTerms`.

    Terms (each off at weight 0): ``consistency`` (``T_{a→b}(ŷ_a)`` vs ``ŷ_b``), ``alignment``
    (vs the ground truth of b where labelled), ``cycle`` (``T_{b→a}(T_{a→b}(ŷ_a))`` vs ``ŷ_a``),
    ``contrastive`` (InfoNCE between pooled embeddings of ``ŷ_b`` and ``T_{a→b}(ŷ_a)`` of the
    same image, negatives gathered across processes).
    """

    consistency: TermConfig = field(default_factory=TermConfig)
    alignment: TermConfig = field(default_factory=TermConfig)
    cycle: TermConfig = field(default_factory=TermConfig)
    contrastive: TermConfig = field(default_factory=TermConfig)
    pairs: list[list[str]] | None = None  # [[a, b], ...]; None: every ordered pair
    # transfer U-Net stages; the reference's 64/128/256 sit beside 128-channel decoders, these
    # beside mini-scenes' 32 (README "Cross-task alignment losses": the cost of each term)
    widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    class_distance: str = "kl"  # tasks with classes: "kl", or "ce" on the direct argmax
    temperature: float = 0.1  # contrastive
    embed_dim: int = 64  # contrastive projector

    def active(self) -> dict[str, TermConfig]:
        """The terms with a weight above 0, by name."""
        terms = {n: getattr(self, n) for n in XTASK_TERMS}
        return {n: t for n, t in terms.items() if t.weight > 0}


XTASK_TERMS = ("consistency", "alignment", "cycle", "contrastive")


@dataclass
class PartialConfig:
    """Partially labelled training data (dense runs): which (image, task) labels training sees,
    and the method that uses the unlabelled pairs.

    ``protocol``: ``full`` (every label), ``one-label`` (one task per image, balanced),
    ``random-labels`` (a random non-empty, non-full subset per image), ``fraction`` (each task on
    ``fraction`` of the images, or ``fractions.<task>``), ``file`` (``file``: our JSON split, or
    MTPSL's ``.pth`` ``labels_weights`` with its column order in ``file_tasks``). The split is
    drawn from ``seed`` (None: the run's seed), applies to the training images only, and is saved
    as ``label_split.json`` in the run folder. ``method``: ``none``, ``mtpsl`` or ``jtr``, whose
    loss is weighted by ``weight``, ramped up linearly over ``rampup_steps``.
    """

    protocol: str = "full"
    fraction: float = 1.0
    fractions: dict[str, float] = field(default_factory=dict)
    file: str | None = None
    file_tasks: list[str] = field(default_factory=list)
    seed: int | None = None
    method: str = "none"
    weight: float = 1.0
    rampup_steps: int = 0
    mtpsl: MTPSLConfig = field(default_factory=MTPSLConfig)
    jtr: JTRConfig = field(default_factory=JTRConfig)


@dataclass
class Config:
    """A whole run: data, model, teachers, student objective and training, outputs."""

    preset: str = "custom"
    name: str | None = None  # run name; None: <preset>-<timestamp>
    output_dir: str = "runs"
    seed: int = 0
    split: str = "test"  # the split reported in metrics.json; selection always uses "val"
    baseline: bool = True  # also train the same student without distillation
    resume: bool | str = False  # true: latest checkpoint of runs/<name>; or a checkpoint dir
    overwrite: bool = False  # true: delete an existing run folder of this name and start anew
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    cpu: bool = False  # force CPU even where CUDA exists
    progress: bool = True
    # experiment trackers through accelerate (unirep.training.tracking): none, tensorboard, wandb, mlflow,
    # or all (every one installed); they write under <run>/logs/ beside the CSV logs
    log_with: str = "none"
    student: str | None = None  # scripts/evaluate.py: a student/ export or a run folder
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    weighting: Spec = field(
        default_factory=lambda: Spec("sum")
    )  # task balancing: sum, uncertainty...
    train: TrainConfig = field(default_factory=TrainConfig)
    dense: DenseConfig | None = None  # set: a dense multi-task run (see DenseConfig)
    partial: PartialConfig = field(default_factory=PartialConfig)  # partially labelled (dense)
    xtask: CrossTaskConfig = field(default_factory=CrossTaskConfig)  # cross-task terms (dense)


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _fix_yaml_floats(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; read such strings as numbers."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _fix_yaml_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_yaml_floats(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        expected = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")
    if tp is Any:
        return _fix_yaml_floats(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if tp is Spec and isinstance(value, str):
            return Spec(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {
            _coerce(k, key_tp, f"{key}"): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        value = _fix_yaml_floats(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported annotation {tp!r}")


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys here: {', '.join(sorted(known))}"
            )
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


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


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain, YAML-serialisable data."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# Presets, overrides and saving


def preset_names() -> list[str]:
    """Names of the presets shipped as package data."""
    folder = resources.files("unirep.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(preset_or_path: str) -> tuple[str, dict[str, Any]]:
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        name = path.stem
        text = path.read_text()
    else:
        if preset_or_path not in preset_names():
            raise ConfigError(
                f"unknown preset {preset_or_path!r}; valid presets: {', '.join(preset_names())} "
                "(or a path to a .yaml file)"
            )
        name = preset_or_path
        text = (resources.files("unirep.config") / "presets" / f"{preset_or_path}.yaml").read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {preset_or_path!r} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config {preset_or_path!r} must be a mapping at the top level")
    base = values.pop("base", None)
    if base is not None:  # a preset written as changes to another preset
        if not isinstance(base, str) or base == preset_or_path:
            raise ConfigError(f"config {preset_or_path!r}: 'base' must name another preset or file")
        _, inherited = _read_yaml(base)
        inherited.pop("preset", None)
        values = _merge(inherited, values)
    return name, values


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` over ``base``, recursively for nested mappings."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
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


def read_config(preset_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a preset name or YAML path (default ``mini-decathlon``) and apply overrides.

    Keys and types are checked here; values, cross-field rules and registry names are checked by
    :func:`unirep.pipeline.validate.load_config`, the entry point scripts use.
    """
    name, values = _read_yaml(preset_or_path or "mini-decathlon")
    values.setdefault("preset", name)
    for override in overrides or []:
        apply_override(values, override)
    return from_dict(Config, values)


def save_config(cfg: Config, path: Path) -> None:
    """Write the fully resolved config as YAML, atomically."""
    from unirep.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def cache_dir(cfg: Config) -> Path:
    """Where generated data, computed statistics and default teachers live."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    env = os.environ.get("UNIREP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "unirep"
