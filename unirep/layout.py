"""The file and folder names of everything unirep writes, defined once.

Three folders have a contract (``docs/run-directory.md``):

- a **run directory** ``<output_dir>/<name>/``: :data:`CONFIG`, :data:`METRICS`, :data:`REPORT`
  and its figures, :data:`LOGS` (one CSV per phase), :data:`CHECKPOINTS` (one folder per phase,
  one ``step_<n>`` folder per checkpoint), the exported :data:`STUDENT`, and for partially
  labelled runs :data:`LABEL_SPLIT`;
- a **teacher folder** ``<teacher_root>/<preset>/<task>/``: :data:`WEIGHTS` and
  :data:`TEACHER_MANIFEST`;
- an **exported student** (``<run>/student/``): :data:`WEIGHTS`, :data:`STUDENT_MANIFEST`, the
  model card :data:`MODEL_CARD` and the timm folder :data:`BACKBONE` (:data:`TIMM_CONFIG` and
  :data:`WEIGHTS`).

Every module that reads or writes one of these names imports it from here
(``tests/unit/test_layout.py`` checks that no other module spells them).
"""

from __future__ import annotations

from pathlib import Path

# -- a run directory ---------------------------------------------------------------------------
CONFIG = "config.yaml"  # the fully resolved config of the run
METRICS = "metrics.json"  # written last: its presence means the run is finished
SUBMISSION = "results.json"  # Visual Decathlon's test predictions, in the official format
REPORT = "report.md"
CURVES_FIGURE = "training_curves.png"
PER_TASK_FIGURE = "per_task_metrics.png"
WEIGHTING_FIGURE = "weighting.png"
GRID_FIGURE = "qualitative.png"
LABEL_SPLIT = "label_split.json"  # which training image is labelled for which task
FUSION = "fusion"  # progressive decoder fusion: <role>-stage<k>.json, the grouping after stage k
BRANCHING = "branching"  # AutoMTL: <role>.json, the architecture its search chose
BRANCHING_FIGURE = "branching.png"  # which task shares which encoder layer
SALIENCY_FIGURE = "saliency.png"  # SRDML: the learned task relation over training and at the end
PRUNING = "pruning"  # DiSparse: <role>.json, the densities and the tasks' keep-mask IoU
PRUNING_FIGURE = "pruning.png"  # per-layer density and IoU of the tasks' keep masks
UNIT_MASKS = "unit_masks"  # pruned auxiliary network: <role>.json, the units each task keeps
COMPARISON = "comparison.md"  # ``unirep compare``'s table, in its own folder
LOGS = "logs"
CHECKPOINTS = "checkpoints"
STUDENT = "student"
TEACHER_PHASE = "teacher"  # checkpoints/teacher/: the teachers' evaluations of this run

# -- a phase's checkpoints (``checkpoints/<phase>/``) ----------------------------------------
STEP_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"  # written last in a step folder: the step is complete
DONE = "done.json"  # the phase is finished
BEST = "best.safetensors"  # the weights selected on validation
OPTIMIZERS = "optim.pt"

# -- weights, teachers and students --------------------------------------------------------------
WEIGHTS = "model.safetensors"
TEACHER_MANIFEST = "teacher.json"
STUDENT_MANIFEST = "manifest.json"
MODEL_CARD = "README.md"
BACKBONE = "backbone"  # the student's trunk as a timm model folder
TIMM_CONFIG = "config.json"
TORCH_PROGRAM = "model.pt2"  # the backbone as a torch.export program: loads without unirep
OUTPUT_CACHE_MANIFEST = "manifest.json"  # a teacher-output cache folder, written last


def log_file(run_dir: Path, phase: str) -> Path:
    """The CSV log of ``phase`` (``teacher-<task>``, ``baseline``, ``student``)."""
    return Path(run_dir) / LOGS / f"{phase}.csv"


def checkpoint_dir(run_dir: Path, phase: str) -> Path:
    """The folder of ``phase``'s checkpoints."""
    return Path(run_dir) / CHECKPOINTS / phase


def step_dir(directory: Path, step: int) -> Path:
    """The checkpoint of ``step`` in a phase's checkpoint folder."""
    return Path(directory) / f"{STEP_PREFIX}{step:06d}"


def evaluation_file(directory: Path, split: str, label: str = "") -> Path:
    """A phase's stored evaluation on ``split`` (``label``: a variant, e.g. ``full_label_``),
    in its checkpoint folder ``directory``."""
    return Path(directory) / f"evaluation_{label}{split}.json"


def student_dir(run_dir: Path) -> Path:
    """The exported student of a run."""
    return Path(run_dir) / STUDENT
