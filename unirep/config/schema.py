"""The schema: dataclasses whose YAML instances are the presets, keys grouped by concern.

A run is **classification** (section ``classification``, the default: Visual Decathlon, Hugging
Face domains, the generated mini-decathlon) or **dense** (section ``dense``: NYUv2, Cityscapes,
the generated mini-scenes). What applies to one kind lives in its section; the sections every
run has are ``data`` (where samples come from and how they are batched), ``teachers`` (stage
one, and how the frozen teachers run in stage two), ``distill`` (the distillation terms common to
both kinds), ``weighting`` (task balancing) and ``train`` (the baseline's and student's recipe).

Types, choices (``Literal``) and ranges (``Annotated[..., Range(...)]``) are read by the generic
binder (:mod:`unirep.config.binder`); the rules that relate several keys, or a key to a
registry or to the data, sit next to what they validate (each package's ``validation`` module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from unirep.config.binder import NonEmpty, Pattern, Range, Unique

AtLeastOne = Annotated[int, Range(ge=1, text="a positive integer (>= 1)")]
NonNegativeInt = Annotated[int, Range(ge=0, text="an integer >= 0")]
Weight = Annotated[float, Range(ge=0, text="a finite number >= 0")]
PositiveNumber = Annotated[float, Range(gt=0, text="a finite number > 0")]
Names = Annotated[list[str], Unique()]  # domains or tasks, each named once
RunName = Annotated[
    str,
    Pattern(
        r"(?:[A-Za-z0-9][A-Za-z0-9._+=,@-]*)(?:/[A-Za-z0-9][A-Za-z0-9._+=,@-]*)*",
        "a folder name under output_dir (letters, digits and ._+=,@- ; not starting with '.' "
        "or '-'; '/' only between such names)",
    ),
]
LearningRate = Annotated[float, Range(gt=0, text="a positive learning rate")]
Fraction = Annotated[float, Range(ge=0, le=1, text="a fraction in [0, 1]")]
GradClip = Annotated[float, Range(gt=0, text="a positive number, or null for no clipping")]
Widths = Annotated[
    list[Annotated[int, Range(ge=1, text="a list of positive channel counts")]], NonEmpty()
]


@dataclass
class Spec:
    """An interchangeable component: a registry name plus its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_name(cls, name: str) -> Spec:
        """A spec written as its bare name (``weighting: famo``)."""
        return cls(name)


# --------------------------------------------------------------------------------------------
# Sections every run has


@dataclass
class DataConfig:
    """Where the samples come from and how they are batched.

    ``source`` is a data-source registry name: ``synthetic-decathlon`` (generated on first use),
    ``decathlon`` (a Visual Decathlon tree at ``root``), ``hf`` (Hugging Face domains only) for
    classification runs; ``mini-scenes`` (generated) or ``mtan`` (a folder at ``root``) for dense
    runs.
    """

    source: str = "synthetic-decathlon"
    root: str | None = None  # None: <cache_dir>/<source>-<seed> for generated sources
    cache_dir: str | None = None  # None: $UNIREP_CACHE or ~/.cache/unirep
    batch_size: AtLeastOne = 32  # per stream and per process
    eval_batch_size: AtLeastOne = 256
    num_workers: NonNegativeInt = 0
    # decoded training-resolution samples kept in memory up to this size (MiB; 0: off); the
    # random augmentation is still drawn per sample: the same numbers (unirep.data.memory)
    memory_cache_mib: Annotated[float, Range(ge=0, text="a size in MiB >= 0 (0: off)")] = 0
    on_corrupt: Literal["error", "skip"] = "error"
    generator: dict[str, Any] = field(default_factory=dict)  # kwargs of a generated source


@dataclass
class OptimConfig:
    """An optimizer and its learning-rate schedule (schedule lengths are in optimizer steps)."""

    optimizer: Spec = field(default_factory=lambda: Spec("sgd", {"lr": 0.05, "momentum": 0.9}))
    scheduler: Spec = field(default_factory=lambda: Spec("cosine"))


@dataclass
class TrainConfig:
    """One training phase (a teacher, the baseline or the student): length, evaluation,
    checkpoints. The baseline and the student select on the validation split; teachers on their
    task's main metric."""

    max_steps: AtLeastOne = 300
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            Spec("adam", {"lr": 0.01, "weight_decay": 5e-4}), Spec("cosine")
        )
    )
    grad_clip: GradClip | None = None
    gradient_accumulation_steps: AtLeastOne = 1
    eval_every: AtLeastOne = 100
    checkpoint_every: AtLeastOne = 100
    keep_checkpoints: AtLeastOne = 2
    log_every: AtLeastOne = 10
    # a NaN/inf loss or gradient: "stop" the run, or "skip" the step
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # mixup's α (Zhang et al., ICLR 2018), classification only: each stream's batch is mixed
    # with a permutation of itself, λ ~ Beta(α, α) drawn from (seed, step, micro-batch,
    # process); the labels are mixed in the task loss and the teachers see the mixed images
    # (consistent function matching, Beyer et al., CVPR 2022); 0: off (unirep.batch.mix_batch)
    mixup: Annotated[float, Range(ge=0, text="mixup's alpha, a number >= 0 (0: off)")] = 0.0
    # every N optimizer steps: per-task gradient cosines and per-layer task dominance of the
    # shared parameters (T extra backward passes on those steps); 0: off
    diagnostics_every: Annotated[int, Range(ge=0, text="an integer >= 0 (0: off)")] = 0
    # speed only (the same maths, to float rounding): the networks and inputs in channels-last
    # (NHWC) memory format; torch.compile of the student's forward (for CUDA; on CPU it needs a
    # C++ compiler, checked at start-up)
    channels_last: bool = False
    compile: bool = False


@dataclass
class OutputCacheConfig:
    """The teacher-output cache (FKD, Shen & Xing, ECCV 2022; :mod:`unirep.teachers.output_cache`):
    ``draws`` pre-drawn augmentations per training sample and the teachers' outputs on them,
    computed once into ``<teacher_root>/outputs/`` and read by the student instead of running the
    teachers (0: the teachers run at every step), stored in ``dtype``."""

    draws: Annotated[int, Range(ge=0, text="an integer >= 0 (0: teachers run online)")] = 0
    dtype: Literal["float16", "float32"] = "float16"


@dataclass
class TeachersConfig:
    """Stage one (one single-task network per task, trained when missing) and how the frozen
    teachers run beside the student."""

    root: str | None = None  # None: <cache_dir>/teachers
    train: TrainConfig = field(default_factory=TrainConfig)
    retrain: bool = False
    # under autocast in bf16 or fp16 (null: the run's mixed_precision), outputs cast back to
    # float32; teachers of one architecture and input shape evaluated as one vmapped call
    autocast: Literal["bf16", "fp16"] | None = None
    batched: bool = False
    output_cache: OutputCacheConfig = field(default_factory=OutputCacheConfig)


@dataclass
class DistillConfig:
    """The distillation terms both kinds of run share: λ_f·feature distillation to each
    teacher's feature through the student's alignment adapters and λ_p·prediction distillation
    (Li, Liu & Bilen, IJCV 2023, Eq. 3).

    λ values are per task (``lambda_feature`` / ``lambda_prediction`` entries), falling back to
    ``default_lambda``; ``annealing`` scales both over training (``linear``: 1 → 0, as in URL).
    """

    feature_loss: Spec = field(default_factory=lambda: Spec("cka_rbf"))
    default_lambda: Weight = 1.0
    lambda_feature: dict[str, Weight] = field(default_factory=dict)
    lambda_prediction: dict[str, Weight] = field(default_factory=dict)
    feature_scale: Weight = 1.0  # global σ of URL
    prediction_scale: Weight = 1.0  # global β of URL
    annealing: Literal["linear", "none"] = "linear"
    enabled: bool = True  # false: the student trains without the teachers' losses (a variant)
    # CRD-style in-batch contrastive distillation (Tian et al. 2020), added to the feature term:
    # InfoNCE of the adapted student feature against the teachers' features of the batch
    contrastive_weight: Weight = 0.0
    contrastive_temperature: PositiveNumber = 0.1


# --------------------------------------------------------------------------------------------
# Classification runs


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
class CarvedTaskConfig:
    """One task carved from a domain: the domain and the 0-based indices of its categories (in
    the annotation file's order) that make the task's classes, relabelled 0..k−1 in sorted
    order."""

    domain: str
    classes: Annotated[list[NonNegativeInt], Unique()] = field(default_factory=list)


@dataclass
class OverlapConfig:
    """Small classification tasks with partly overlapping label sets, carved from the domains
    (:mod:`unirep.data.classification.overlap`): the run's tasks are ``tasks`` instead of the
    domains. Each task trains on ``samples_per_class`` images of each of its classes (tasks that
    share a class see different images of it while the domain has enough), drawn with ``seed``;
    its validation and test splits are the domain's, restricted to its classes."""

    tasks: dict[str, CarvedTaskConfig] = field(default_factory=dict)
    samples_per_class: AtLeastOne = 8
    seed: Annotated[int, Range(ge=0, lt=2**32, text="an integer in [0, 2**32)")] = 0


@dataclass
class ClassificationConfig:
    """A multi-domain classification run: one task (and input stream) per domain, a backbone
    shared by the student with one linear head per domain.

    Domains and their images: ``domains`` picks the source's domains (empty: all of them),
    ``hf_domains`` adds Hugging Face ones; images are resized (shorter side, or square for the
    ``square_resize`` domains), cropped (``crop``, or ``crops.<domain>``) and flipped except in
    ``no_flip`` domains (a flip changes their class). The network: ``backbone`` (a unirep
    backbone or any timm model), the alignment ``adapter`` of each domain (URL), optional
    parallel residual adapters with per-domain BN (``residual_adapters``, student only). The
    student's own terms: ``task_loss``, ``prediction_loss``, ``init_from_teacher`` (the domain
    whose teacher's trunk initialises the student), ``selection_metric`` on the validation split.
    Stage one's fine-tuning recipe: the teacher of ``finetune_from`` is trained from scratch with
    ``teachers.train`` and initialises every other domain's teacher, trained with
    ``finetune_train`` and ``finetune_lr.<domain>`` (Rebuffi et al. 2017).
    """

    domains: Names = field(default_factory=list)  # empty: every domain the source has
    hf_domains: dict[str, HFDomainConfig] = field(default_factory=dict)
    batch_sizes: dict[str, AtLeastOne] = field(default_factory=dict)  # per domain
    resize: AtLeastOne = 32  # shorter side after resizing
    crop: AtLeastOne = 28  # training / evaluation crop
    crops: dict[str, AtLeastOne] = field(default_factory=dict)  # per domain (Decathlon: 72)
    no_flip: Names = field(default_factory=list)
    square_resize: Names = field(default_factory=list)
    backbone: str = "resnet_decathlon_tiny"  # a unirep backbone or any timm model name
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter: Spec = field(default_factory=lambda: Spec("linear"))
    residual_adapters: bool = False
    # what the student's domains share (unirep.models.sharing): smtl (kwargs gate: softmax |
    # sigmoid | lite, tau, distill_from); null: one shared backbone
    sharing: Spec | None = None
    task_loss: Spec = field(default_factory=lambda: Spec("cross_entropy"))
    prediction_loss: Spec = field(default_factory=lambda: Spec("kl", {"temperature": 4.0}))
    init_from_teacher: str | None = None
    selection_metric: Literal["accuracy", "delta_m"] = "accuracy"
    finetune_from: str | None = None
    finetune_train: TrainConfig | None = None
    finetune_lr: dict[str, LearningRate] = field(default_factory=dict)
    # tasks carved from the domains with partly overlapping class sets; null: one task per domain
    overlap: OverlapConfig | None = None


# --------------------------------------------------------------------------------------------
# Dense runs


@dataclass
class DenseTaskConfig:
    """One dense task of a multi-task run: its supervised loss, weight and prediction distillation.

    ``loss`` is a task-loss registry name fitting the task's kind. ``prediction_loss`` (optional)
    distils the teacher's prediction of this task (``kl`` on segmentation logits, ``dense_l1`` on
    depth or normals); None leaves it out (URL's NYUv2 recipe has none). ``kind`` says what the
    task predicts, a dense kind of :data:`unirep.tasks.TASK_KINDS`; None means the task's name is
    its kind.
    """

    loss: Spec
    weight: Weight = 1.0
    prediction_loss: Spec | None = None
    kind: str | None = None


@dataclass
class MTPSLConfig:
    """MTPSL's pairwise joint task spaces (Li, Liu & Bilen, CVPR 2022): see
    :class:`unirep.losses.joint.MTPSLLoss`."""

    lambda_reg: Weight = 0.5  # the regulariser tying both mappings to the student's feature
    mode: Literal["partial", "full"] = "partial"  # (unlabelled s, labelled t) pairs, or all
    film_lr: LearningRate = 1e-3  # FiLM γ/β learning rate (reference: NYUv2 1e-3, Cityscapes 1e-5)
    widths: Widths = field(default_factory=lambda: [16, 32, 64])  # mapping network stages


@dataclass
class JTRConfig:
    """JTR's joint-task regularisation (Nishi et al., CVPR 2024): see
    :class:`unirep.losses.joint.JTRLoss`."""

    distance_weight: Weight = 4.0
    reconstruction_weight: Weight = 2.0
    widths: Widths = field(default_factory=lambda: [32, 64])  # encoder-decoder stages


@dataclass
class PartialConfig:
    """Partially labelled training data: which (image, task) labels training sees, and the
    method that uses the unlabelled pairs.

    ``protocol``: ``full`` (every label), ``one-label`` (one task per image, balanced),
    ``random-labels`` (a random non-empty, non-full subset per image), ``fraction`` (each task on
    ``fraction`` of the images, or ``fractions.<task>``), ``file`` (``file``: our JSON split, or
    MTPSL's ``.pth`` ``labels_weights`` with its column order in ``file_tasks``). The split is
    drawn from ``seed`` (None: the run's seed), applies to the training images only, and is saved
    as ``label_split.json`` in the run folder. ``method``: ``none``, ``mtpsl`` or ``jtr``, whose
    loss is weighted by ``weight``, ramped up linearly over ``rampup_steps``.
    """

    protocol: Literal["full", "one-label", "random-labels", "fraction", "file"] = "full"
    fraction: Fraction = 1.0
    fractions: dict[str, Fraction] = field(default_factory=dict)
    file: str | None = None
    file_tasks: Names = field(default_factory=list)
    seed: int | None = None
    method: Literal["none", "mtpsl", "jtr"] = "none"
    weight: Weight = 1.0
    rampup_steps: NonNegativeInt = 0
    mtpsl: MTPSLConfig = field(default_factory=MTPSLConfig)
    jtr: JTRConfig = field(default_factory=JTRConfig)


@dataclass
class TermConfig:
    """One loss term: its weight (0: off) and a linear ramp-up from 0 over ``rampup_steps``."""

    weight: Annotated[float, Range(ge=0, text="a finite number >= 0 (0: off)")] = 0.0
    rampup_steps: NonNegativeInt = 0


TRANSFER_TERMS = ("consistency", "alignment", "cycle", "contrastive")


@dataclass
class TransferConfig:
    """Cross-task consistency terms through task-transfer networks (Nakano, Chen & Demachi
    2021): a small U-Net ``T_{a→b}`` for every ordered pair of the run's tasks (or ``pairs``),
    trained with the student and dropped at export: see
    :class:`unirep.losses.transfer.CrossTaskTerms`.

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
    # beside mini-scenes' 32
    widths: Widths = field(default_factory=lambda: [8, 16, 32])
    class_distance: Literal["kl", "ce"] = "kl"  # tasks with classes: KL, or CE on the argmax
    temperature: PositiveNumber = 0.1  # contrastive
    embed_dim: AtLeastOne = 64  # contrastive projector

    def active(self) -> dict[str, TermConfig]:
        """The terms with a weight above 0, by name."""
        terms = {n: getattr(self, n) for n in TRANSFER_TERMS}
        return {n: t for n, t in terms.items() if t.weight > 0}


@dataclass
class SaliencyConfig:
    """Task relations from input-gradient saliency (SRDML: Bai & Zhao, KDD 2022): the term
    ``weight · Σ_{u<v} (c_uv/Σc)·‖α_u − α_v‖₁`` on each task's spatially pooled gradient of its
    output w.r.t. the shared encoder stages, with a learned relation ``c`` on the simplex, each
    pair's weight at least ``floor`` (at most ``1 − (P−1)·floor`` for ``P`` pairs; ``floor ≤ 1/P``)
    and updated by a gradient step of size ``relation_lr`` (:mod:`unirep.losses.saliency`).
    The student only; not with ``cross_task`` or ``sharing``."""

    weight: Annotated[float, Range(ge=0, text="a finite number >= 0 (0: off)")] = 0.1  # μ
    rampup_steps: NonNegativeInt = 0
    relation_lr: PositiveNumber = 0.01
    floor: Annotated[float, Range(ge=0, le=1, text="a pair's least weight in [0, 1/pairs]")] = 0.05


@dataclass
class DenseConfig:
    """Multi-task dense prediction (NYUv2, Cityscapes, mini-scenes) in the MTAN file format.

    Setting this section makes a run dense: one teacher per task, then a multi-task student with
    a shared encoder, per-task decoders and heads, optional cross-task attention and URL's two
    alignment adapters per task. ``data.source`` is then ``mtan`` (a folder at ``data.root``) or
    ``mini-scenes`` (generated on first use with ``data.generator`` arguments). ``partial`` says
    which training labels are seen (and the method for the rest), ``transfer`` adds cross-task
    consistency terms, ``saliency`` SRDML's task relations. Dense runs select on Δm against the
    teachers on the validation split.
    """

    tasks: dict[str, DenseTaskConfig] = field(default_factory=dict)
    num_classes: Annotated[int, Range(ge=2, text="an integer >= 2")] = 13  # semantic classes
    label_dir: str = "label"  # Cityscapes: label_7 or label_19
    inverse_depth: bool = False  # depth files hold inverse depth (Cityscapes' disparity)
    scales: list[Annotated[float, Range(ge=1, text="finite zoom factors >= 1.0")]] = field(
        default_factory=lambda: [1.0, 1.2, 1.5]
    )  # MTAN scale-crop
    flip: bool = True
    augment: bool = True
    val_folder: str | None = None  # None: carve val_fraction of the training folder
    val_fraction: Annotated[float, Range(gt=0, lt=1, text="in (0, 1)")] = 0.1
    test_folder: str = "val"  # MTAN's "val" folder is the standard test set
    encoder: Spec = field(default_factory=lambda: Spec("segnet"))  # segnet or timm
    # the student's (and baseline's) own encoder, e.g. a wider one; null: the teachers' encoder
    student_encoder: Spec | None = None
    decoder_channels: AtLeastOne = 64
    cross_task: Spec | None = None  # attention modules: mtan or densemtl
    # the student's architecture when it decides what the tasks share (unirep.models.sharing):
    # smtl (kwargs gate: softmax | sigmoid | lite, tau, after_decoders, distill_from); null: one
    # shared encoder
    sharing: Spec | None = None
    partial: PartialConfig = field(default_factory=PartialConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    saliency: SaliencyConfig | None = None  # SRDML's task relations (the student's); null: off


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Config:
    """A whole run: its kind's section (``classification`` or ``dense``), data, teachers,
    distillation, task weighting, the training recipe and where the outputs go."""

    preset: str = "custom"
    name: RunName | None = None  # run name; None: <preset>-<timestamp>
    output_dir: str = "runs"
    seed: Annotated[int, Range(ge=0, lt=2**32, text="an integer in [0, 2**32)")] = 0
    split: Literal["train", "val", "test"] = "test"  # reported in metrics.json; selection: val
    baseline: bool = True  # also train the same student without distillation
    resume: bool | str = False  # true: latest checkpoint of <output_dir>/<name>; or a checkpoint
    overwrite: bool = False  # true: delete an existing run folder of this name and start anew
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False  # force CPU even where CUDA exists
    progress: bool = True
    # experiment trackers through accelerate: none, tensorboard, wandb, mlflow, or all (every
    # one installed); they write under <run>/logs/ beside the CSV logs
    log_with: Literal["none", "tensorboard", "wandb", "mlflow", "all"] = "none"
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    weighting: Spec = field(default_factory=lambda: Spec("sum"))  # sum, uncertainty, famo, ...
    train: TrainConfig = field(default_factory=TrainConfig)
    classification: ClassificationConfig | None = None  # set (or neither set): classification
    dense: DenseConfig | None = None  # set: a dense multi-task run

    def __post_init__(self) -> None:
        if self.classification is None and self.dense is None:
            self.classification = ClassificationConfig()

    @property
    def kind(self) -> str:
        """``"dense"`` or ``"classification"``: the run's kind, from its section."""
        return "dense" if self.dense is not None else "classification"

    def recipes(self) -> dict[str, TrainConfig]:
        """Every training recipe of the run, by its key: the baseline's and student's
        (``train``), the teachers' (``teachers.train``) and the fine-tuned teachers'."""
        recipes = {"train": self.train, "teachers.train": self.teachers.train}
        if self.classification is not None and self.classification.finetune_train is not None:
            recipes["classification.finetune_train"] = self.classification.finetune_train
        return recipes

    @property
    def selection_metric(self) -> str:
        """What the baseline and the student select on: ``accuracy`` or ``delta_m`` (dense
        runs always select on Δm against the teachers)."""
        if self.classification is not None:
            return self.classification.selection_metric
        return "delta_m"
