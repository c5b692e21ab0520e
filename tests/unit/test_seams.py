"""The redesign's seams: tasks as data, one batch type, one trainable module, full resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from tests.conftest import fit_interrupted, tiny_config, tiny_dense_config
from unirep.batch import make_batch
from unirep.losses import TASK_LOSSES
from unirep.models.build import architecture, build_network
from unirep.objective import Objective, masked_loss
from unirep.pipeline.stage_two import resolve_data
from unirep.tasks import TASK_KINDS, Task
from unirep.training.trainable import TrainableModule
from unirep.weighting import build_weighting

KIND_SHAPES = {  # kind -> (num_classes, raw output [B, C, ...], target)
    "classification": (5, (4, 5), lambda: torch.tensor([0, 1, 4, -1])),
    "semantic": (3, (2, 3, 4, 4), lambda: torch.randint(-1, 3, (2, 4, 4))),
    "depth": (None, (2, 1, 4, 4), lambda: torch.rand(2, 1, 4, 4) + 0.1),
    "normal": (None, (2, 3, 4, 4), lambda: nn.functional.normalize(torch.randn(2, 3, 4, 4), dim=1)),
}


@pytest.mark.parametrize("kind", TASK_KINDS.names())
def test_every_task_kind_is_complete(kind: str) -> None:
    """Each kind: channels, a supervised loss with gradient, a meter that computes its main
    metric, predictions the meter accepts; a prediction-distillation default that builds."""
    assert kind in KIND_SHAPES, f"add {kind!r} to KIND_SHAPES"
    classes, shape, target = KIND_SHAPES[kind]
    task = Task("t", TASK_KINDS.build(kind), "s", num_classes=classes)
    assert task.out_channels == shape[1]
    raw = torch.randn(*shape, requires_grad=True)
    if task.kind.unit_vector:
        raw = nn.functional.normalize(raw, dim=1)
    y = target()
    loss = TASK_LOSSES.build(task.loss[0], **task.loss[1])(raw, y)
    loss.backward()
    assert torch.isfinite(loss)
    meter = task.meter()
    meter.update(task.predictions(raw.detach()), y)
    values = meter.compute()
    assert list(values) == task.metric_names and values[task.main_metric] is not None
    assert isinstance(task.higher_is_better, bool)
    assert Task.from_record("t", task.record()).out_channels == task.out_channels


def test_an_empty_meter_reports_none() -> None:
    for kind in TASK_KINDS.names():
        task = Task("t", TASK_KINDS.build(kind), "s", num_classes=KIND_SHAPES[kind][0])
        assert all(v is None for v in task.meter().compute().values())


def test_masked_loss_ignores_unlabelled_samples_exactly() -> None:
    loss_fn = TASK_LOSSES.build("cross_entropy")
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    mask = torch.tensor([True, False, True, False])
    masked = masked_loss(loss_fn, logits, labels, mask)
    assert torch.allclose(masked, loss_fn(logits[mask], labels[mask]))
    masked.backward()
    assert torch.all(logits.grad[~mask] == 0)
    none = masked_loss(loss_fn, logits, labels, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def test_make_batch_carries_masks_ids_and_augmentation() -> None:
    tasks = {
        "a": Task("a", TASK_KINDS.build("classification"), "a", num_classes=3),
        "b": Task("b", TASK_KINDS.build("classification"), "b", num_classes=3),
    }
    raw = {
        "a": {"image": torch.zeros(2, 3, 8, 8), "label": torch.tensor([0, 1]),
              "id": torch.tensor([7, 9]), "aug": {"flip": torch.tensor([True, False])}},
        "b": {"image": torch.zeros(3, 3, 8, 8), "label": torch.tensor([2, 1, 0]),
              "image_id": torch.tensor([1, 2, 3])},
    }  # fmt: skip
    batch = make_batch(raw, tasks)
    assert set(batch.inputs) == {"a", "b"} and batch.targets["b"].tolist() == [2, 1, 0]
    assert batch.label_mask["a"].dtype == torch.bool and batch.label_mask["b"].all()
    assert batch.ids["a"].tolist() == [7, 9] and batch.ids["b"].tolist() == [1, 2, 3]
    assert batch.aug["a"]["flip"].tolist() == [True, False]


def test_trainable_module_groups_come_from_modules(tiny_cache: Path, tmp_path: Path) -> None:
    """Student, objective and weighting state go to the main optimizer; adapters to their own;
    a teacher is never inside the trainable module."""
    cfg = tiny_config(tiny_cache, tmp_path, "weighting=uncertainty")
    data = resolve_data(cfg, Accelerator(cpu=True))
    tasks = data.tasks()
    net = build_network(architecture(cfg, student=True), tasks)
    aligners = net.build_aligners({t: net.feature_dim for t in tasks})
    weighting = build_weighting("uncertainty", list(tasks))
    module = TrainableModule(net, Objective(tasks, cfg.distill), weighting, aligners)
    main, adapters = module.parameter_groups()
    assert {id(p) for p in weighting.parameters()} <= {id(p) for p in main}
    assert {id(p) for p in adapters} == {id(p) for p in aligners.parameters()}
    assert not {id(p) for p in main} & {id(p) for p in adapters}
    assert len(main) + len(adapters) == len(list(module.parameters()))
    assert {id(p) for p in module.shared_parameters()} == {id(p) for p in net.trunk.parameters()}


def _train(cfg, run_dir: Path, crash_at: int | None, monkeypatch) -> tuple[dict, list[str]]:
    phase, result = fit_interrupted(cfg, run_dir, "baseline", crash_at, monkeypatch)
    state = {k: v.clone() for k, v in phase.module.state_dict().items()}
    state["best"] = torch.tensor([result.best_val, result.best_step])
    log = (run_dir / "logs" / "baseline.csv").read_text().splitlines()
    return state, log


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mini-decathlon", "mini-scenes"])
def test_interrupted_uncertainty_run_resumes_bit_exactly(
    preset: str, tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights, optimizers, schedules, weighting state, RNG and data position all resume:
    killed after step 4 and resumed, the run equals the uninterrupted one bit for bit."""
    torch.set_num_threads(1)
    extra = ["weighting=uncertainty", "train.max_steps=6", "train.checkpoint_every=2",
             "train.eval_every=3", "train.log_every=1", "train.diagnostics_every=3"]  # fmt: skip
    if preset == "mini-decathlon":
        extra.append("classification.init_from_teacher=null")
    build = tiny_config if preset == "mini-decathlon" else tiny_dense_config
    cfg_a = build(tiny_cache, tmp_path / "a", *extra)
    cfg_b = build(tiny_cache, tmp_path / "b", *extra)
    whole, log_a = _train(cfg_a, tmp_path / "a", None, monkeypatch)
    resumed, log_b = _train(cfg_b, tmp_path / "b", 4, monkeypatch)
    assert set(whole) == set(resumed)
    assert any(k.startswith("weighting.") for k in whole)
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
    assert log_a == log_b
    assert not torch.all(whole["weighting.log_var"] == 0)  # the log-variances did train
    # the task-dominance EMA is resumed too: step 6's measurement builds on step 3's
    assert whole["diagnostics.seen"] and whole["diagnostics.au"].sum() > 0
    measured = [line for line in log_a if ",train/dominance/" in line]
    assert {line.split(",")[0] for line in measured} == {"3", "6"}


def test_a_run_folder_is_never_reused_without_resume(tiny_cache: Path, tmp_path: Path) -> None:
    """Re-running a name without resume=true is refused before any work (issue 9's first fault:
    an old student silently reported under a new config)."""
    from unirep.errors import ConfigError
    from unirep.pipeline.rundir import prepare_run_dir

    accelerator = Accelerator(cpu=True)
    cfg = tiny_config(tiny_cache, tmp_path, "name=once")
    prepare_run_dir(cfg, accelerator)
    again = tiny_config(tiny_cache, tmp_path, "name=once", "train.max_steps=8")
    with pytest.raises(ConfigError, match="resume=true"):
        prepare_run_dir(again, accelerator)
    resumed = tiny_config(tiny_cache, tmp_path, "name=once", "resume=true")
    assert prepare_run_dir(resumed, accelerator) == tmp_path / "once"
