"""Frozen teachers run as cheaply as their outputs allow, with the outputs the losses expect.

Under ``torch.inference_mode`` the outputs are bit-identical to ``torch.no_grad``'s and usable by
a loss's backward; under bf16 autocast (``teachers.autocast``) they come back as float32 within
2 % (relative L2 error) of the float32 outputs; evaluated as one vmapped call
(``teachers.batched``) they equal the one-by-one outputs (atol 1e-5, float32), for dense
teachers (three tasks on one stream) and classification teachers (streams of one shape; another
shape falls back to one by one), every key the losses read included; and ``train_step`` uses
the batched path when the config asks for it, with the same step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

import unirep.teachers.batched as teachers_batched
from tests.conftest import TINY_DENSE
from unirep.batch import Batch
from unirep.errors import ConfigError
from unirep.experiments.benchmark import random_teachers
from unirep.models.build import build_network
from unirep.pipeline.stage_two import resolve_data, student_phase
from unirep.pipeline.validate import load_config
from unirep.tasks import TASK_KINDS, Task
from unirep.teachers.batched import BatchedTeachers, each_teacher, teacher_autocast_dtype
from unirep.teachers.provider import teacher_outputs
from unirep.teachers.store import freeze
from unirep.training.trainer import setup, train_step

DENSE = {"encoder": "segnet", "encoder_kwargs": {"width_mult": 0.125}, "decoder_channels": 8}
CLASSIFICATION = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}}
BF16_TOLERANCE = 0.02  # relative L2 error of bf16 outputs against float32 (2^-8 per rounding)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


def _teachers(arch: dict, tasks: dict[str, Task], seed: int = 0) -> dict[str, nn.Module]:
    """Untrained frozen teachers with batch-norm statistics that are not the identity."""
    torch.manual_seed(seed)
    nets = {}
    for name, task in tasks.items():
        net = build_network(arch, {name: task})
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        nets[name] = freeze(net)
    return nets


def _dense() -> tuple[dict[str, nn.Module], dict[str, Task], Batch]:
    kinds = {"semantic": 7, "depth": None, "normal": None}
    tasks = {n: Task(n, TASK_KINDS.build(n), "images", num_classes=k) for n, k in kinds.items()}
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    return _teachers(DENSE, tasks), tasks, Batch({"images": images}, {}, {})


def _classification(sizes: dict[str, int]) -> tuple[dict[str, nn.Module], dict[str, Task], Batch]:
    """One teacher per domain (classes 2 + i), each reading its own stream of ``sizes[d]``."""
    kind = TASK_KINDS.build("classification")
    tasks = {d: Task(d, kind, d, num_classes=2 + i) for i, d in enumerate(sizes)}
    g = torch.Generator().manual_seed(2)
    inputs = {d: torch.randn(b, 3, 28, 28, generator=g) for d, b in sizes.items()}
    return _teachers(CLASSIFICATION, tasks), tasks, Batch(inputs, {}, {})


def _assert_same(a: dict[str, dict[str, Tensor]], b: dict[str, dict[str, Tensor]]) -> None:
    assert list(a) == list(b)
    for task in a:
        assert list(a[task]) == list(b[task]), task
        for key in a[task]:
            assert a[task][key].dtype == b[task][key].dtype == torch.float32
            torch.testing.assert_close(a[task][key], b[task][key], atol=1e-5, rtol=1e-5)


def test_inference_mode_is_bit_identical_to_no_grad_and_usable_by_a_loss() -> None:
    for teachers, tasks, batch in (_dense(), _classification({"a": 4, "b": 4})):
        with torch.no_grad():
            reference = each_teacher(teachers, tasks, batch.inputs)
        out = teacher_outputs(teachers, tasks, batch)
        for task, outputs in reference.items():
            for key, value in outputs.items():
                assert torch.equal(out[task][key], value), (task, key)
                assert not out[task][key].is_inference()
        # a loss saves the teacher's tensor for its backward: inference tensors would refuse
        student = torch.randn_like(out[task]["features"], requires_grad=True)
        F.mse_loss(student, out[task]["features"]).backward()
        assert student.grad is not None


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
def test_bf16_autocast_is_within_tolerance_of_float32(batched: bool) -> None:
    for teachers, tasks, batch in (_dense(), _classification({"a": 4, "b": 4, "c": 4})):
        fast = BatchedTeachers(teachers, tasks) if batched else None
        full = teacher_outputs(teachers, tasks, batch)
        dtype = teacher_autocast_dtype("bf16", torch.device("cpu"))
        autocast = torch.autocast("cpu", dtype=dtype)
        half = teacher_outputs(teachers, tasks, batch, autocast, fast)
        for task, outputs in full.items():
            for key, value in outputs.items():
                assert half[task][key].dtype == torch.float32
                error = (half[task][key] - value).norm() / value.norm()
                assert 0 < error < BF16_TOLERANCE, (task, key, float(error))


def test_batched_dense_teachers_equal_one_by_one() -> None:
    teachers, tasks, batch = _dense()
    batched = BatchedTeachers(teachers, tasks)
    out = teacher_outputs(teachers, tasks, batch, batched=batched)
    _assert_same(out, teacher_outputs(teachers, tasks, batch))
    assert list(batched.groups) == [("semantic", "depth", "normal")]  # one call for all three
    assert set(out["semantic"]) == {"pred", "features", "bottleneck"}


def test_batched_classification_teachers_equal_one_by_one() -> None:
    """Three streams of one shape go together; a fourth with another batch size goes alone."""
    teachers, tasks, batch = _classification({"a": 4, "b": 4, "c": 4, "d": 6})
    batched = BatchedTeachers(teachers, tasks)
    out = teacher_outputs(teachers, tasks, batch, batched=batched)
    _assert_same(out, teacher_outputs(teachers, tasks, batch))
    assert list(batched.groups) == [("a", "b", "c")]
    assert set(out["a"]) == {"features", "pred"}


def test_teachers_autocast_is_refused_in_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("mini-decathlon", ["teachers.autocast=fp8"])
    message = str(err.value)
    assert "\n" not in message and "'teachers.autocast'" in message
    assert all(choice in message for choice in ("null", "bf16", "fp16"))
    assert load_config("mini-decathlon", ["teachers.autocast=bf16"]).teachers.autocast == "bf16"


def test_train_step_uses_the_batched_teachers(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``teachers.batched=true``: the student's real step calls the teachers as one group and
    logs the same terms as the one-by-one step."""
    calls: list[tuple[str, ...]] = []
    original = teachers_batched.TeacherGroup.__call__

    def spy(self: teachers_batched.TeacherGroup, images: list[Tensor]) -> object:
        calls.append(tuple(self.nets))
        return original(self, images)

    monkeypatch.setattr(teachers_batched.TeacherGroup, "__call__", spy)
    logs = {}
    for batched in (False, True):
        overrides = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}",
                     "cpu=true", f"teachers.batched={str(batched).lower()}"]  # fmt: skip
        cfg = load_config("mini-scenes", overrides)
        accelerator = Accelerator(cpu=True)
        data = resolve_data(cfg, accelerator)
        tasks = data.tasks()
        reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
        teachers = random_teachers(cfg, data)
        work = tmp_path / str(batched)
        phase, _ = student_phase(
            cfg, accelerator, "student", data, tasks, work, teachers, reference, True
        )
        ctx, _ = setup(accelerator, phase)
        assert ctx.teachers is not None and (ctx.teachers._batched is not None) == batched
        logs[batched] = train_step(ctx, 0)
    assert calls == [("semantic", "depth", "normal")]
    assert set(logs[True]) == set(logs[False]) and any(k.startswith("feature/") for k in logs[True])
    for key, value in logs[False].items():
        torch.testing.assert_close(logs[True][key], value, atol=1e-5, rtol=1e-4)
