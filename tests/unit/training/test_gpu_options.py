"""The GPU-ready options run on CPU and give the default's results where the maths is the same.

``train.channels_last``: the same outputs and gradients (a dense and a classification tiny
student), and the same real train step; ``train.compile``: refused at start-up, in one line,
where torch.compile cannot work, and a tiny run still trains where it can; ``mixed_precision:
bf16`` (accelerate's autocast) trains a tiny dense student on CPU, its convolutions in bf16 and
the teachers' outputs back in float32; ``scripts/benchmark.py --options`` times each option
against the default with the benchmark's own machinery.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from torch import Tensor, nn
from unirep.stage_one.keys import teacher_key

import unirep.teachers.provider as provider
import unirep.training.trainer as trainer
from tests.conftest import TINY_DENSE
from unirep.config.schema import Config
from unirep.errors import ConfigError
from unirep.experiments.benchmark import OPTION_VARIANTS, format_term_costs, term_costs
from unirep.io import save_weights
from unirep.models.build import build_network
from unirep.pipeline.rundir import make_accelerator
from unirep.pipeline.stage_two import resolve_data, student_phase
from unirep.pipeline.validate import load_config
from unirep.tasks import TASK_KINDS, Task
from unirep.training.validation import compile_problem as _compile_problem

DENSE = {"encoder": "segnet", "encoder_kwargs": {"width_mult": 0.125}, "decoder_channels": 8}
CLASSIFICATION = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


def _dense_cfg(cache: Path, out: Path, *extra: str) -> Config:
    return load_config(
        "mini-scenes", [*TINY_DENSE, f"data.cache_dir={cache}", f"output_dir={out}", "cpu=true",
                        "train.log_every=1", *extra],
    )  # fmt: skip


def _student(cfg: Config, out: Path, distill: bool = True) -> tuple[Any, Any, Any]:
    """(accelerator, data, phase) of the tiny dense student (untrained teachers) or baseline."""
    from unirep.experiments.benchmark import random_teachers

    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}  # stands in for teachers
    teachers = random_teachers(cfg, data) if distill else {}
    role = "student" if distill else "baseline"
    phase, _ = student_phase(cfg, accelerator, role, data, tasks, out, teachers, reference, distill)
    return accelerator, data, phase


def _steps(cfg: Config, out: Path, steps: int = 2) -> tuple[list[dict[str, Tensor]], Any]:
    """The logs of ``steps`` real train steps of the tiny dense student, and its context (with
    ``initial``, the student's weights before the steps)."""
    accelerator, _, phase = _student(cfg, out)
    ctx, _ = trainer.setup(accelerator, phase)
    ctx.initial = copy.deepcopy(ctx.unwrapped.student.state_dict())
    ctx.module.train()
    return [trainer.train_step(ctx, step) for step in range(steps)], ctx


def _distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """L2 distance between two state dicts' floating tensors."""
    keys = [k for k, v in a.items() if v.is_floating_point()]
    return sum(float((a[k].float() - b[k].float()).square().sum()) for k in keys) ** 0.5


def _close(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float, atol: float) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(
            a[key].double(), b[key].double(), rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )


# --------------------------------------------------------------------------------------------
# channels_last


@pytest.mark.parametrize("kind", ["dense", "classification"])
def test_channels_last_gives_the_same_outputs_and_gradients(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "dense":
        names = {"semantic": 7, "depth": None, "normal": None}
        tasks = {n: Task(n, TASK_KINDS.build(n), "images", num_classes=k) for n, k in names.items()}
        net = build_network(DENSE, tasks)
        inputs = {"images": torch.randn(2, 3, 32, 48)}
    else:
        kind_ = TASK_KINDS.build("classification")
        tasks = {d: Task(d, kind_, d, num_classes=3 + i) for i, d in enumerate(("a", "b"))}
        net = build_network(CLASSIFICATION, tasks)
        inputs = {d: torch.randn(4, 3, 28, 28) for d in tasks}
    # float64: in float32 the NHWC kernels round differently, and in a deep net trained on a
    # tiny batch a 1e-6 difference can flip a ReLU or a max near a tie (a valid but different
    # subgradient); in float64 such flips do not happen, so any layout bug shows.
    net, inputs = net.double(), {s: x.double() for s, x in inputs.items()}
    nhwc = copy.deepcopy(net).to(memory_format=torch.channels_last)
    conv = next(m for m in nhwc.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    results = []
    for model, memory_format in ((net, torch.contiguous_format), (nhwc, torch.channels_last)):
        model.train()
        out = model({s: x.contiguous(memory_format=memory_format) for s, x in inputs.items()})
        loss = sum(o["pred"].square().mean() + o["features"].square().mean() for o in out.values())
        loss.backward()  # type: ignore[union-attr]
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (out, grads), (out_nhwc, grads_nhwc) = results
    for task in out:  # NHWC convolutions round differently: close, not equal
        _close(out[task], out_nhwc[task], rtol=1e-7, atol=1e-9)
    assert len(grads) == len(list(net.parameters()))
    _close(grads, grads_nhwc, rtol=1e-7, atol=1e-9)


def test_channels_last_train_step_matches_the_default(tiny_cache: Path, tmp_path: Path) -> None:
    """Two real steps of the distilled student (weights, teachers and inputs in NHWC): the same
    logged terms and weights as the default; the weights still save (safetensors wants them
    contiguous) and the option leaves the teachers' cache key alone."""
    runs = {}
    for channels_last in (False, True):
        cfg = _dense_cfg(tiny_cache, tmp_path, f"train.channels_last={str(channels_last).lower()}")
        runs[channels_last] = (cfg, *_steps(cfg, tmp_path / str(channels_last)))
    (cfg, logs, ctx), (cfg_nhwc, logs_nhwc, ctx_nhwc) = runs[False], runs[True]
    for a, b in zip(logs, logs_nhwc, strict=True):  # NHWC convolutions round differently
        _close(a, b, rtol=1e-3, atol=1e-4)
    student = ctx_nhwc.unwrapped.student
    conv = next(m for m in student.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # Adam turns a rounding difference in a near-zero gradient into up to lr per element, so
    # the weights are compared as a whole: the two runs took the same steps to 1 % of their size
    moved = _distance(ctx.unwrapped.student.state_dict(), ctx.initial)
    gap = _distance(ctx.unwrapped.student.state_dict(), student.state_dict())
    assert gap < 0.01 * moved, (gap, moved)
    save_weights(tmp_path / "nhwc.safetensors", student.state_dict())
    data = resolve_data(cfg, make_accelerator(cfg))
    assert teacher_key(cfg, data, "depth") == teacher_key(cfg_nhwc, data, "depth")


# --------------------------------------------------------------------------------------------
# compile


def test_compile_is_refused_at_start_up_in_one_line_where_it_cannot_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(long traceback)")

    monkeypatch.setattr(torch, "compile", broken)
    for key in ("train.compile", "teachers.train.compile"):
        with pytest.raises(ConfigError) as err:
            load_config("mini-decathlon", ["cpu=true", f"{key}=true"])
        message = str(err.value)
        assert "\n" not in message and f"'{key}'" in message and "C++ compiler" in message
        assert f"set {key}=false" in message
    assert not load_config("mini-decathlon", ["cpu=true"]).train.compile  # off by default


@pytest.mark.slow
def test_compile_tiny_run_still_trains(tiny_cache: Path, tmp_path: Path) -> None:
    """A compiled student (Inductor; the first step compiles: about 2 s with a warm cache, up to
    two minutes on a cold one on a busy 2-core machine) takes the eager steps, to rounding."""
    problem = _compile_problem("cpu")
    if problem is not None:
        pytest.skip(f"torch.compile does not work on this machine: {problem}")
    eager, _ = _steps(_dense_cfg(tiny_cache, tmp_path, "distill.enabled=false"), tmp_path / "e")
    cfg = _dense_cfg(tiny_cache, tmp_path, "distill.enabled=false", "train.compile=true")
    compiled, ctx = _steps(cfg, tmp_path / "c")
    assert ctx.unwrapped.student._compiled_call_impl is not None
    assert compiled[1]["loss"] < compiled[0]["loss"]  # it trains
    for a, b in zip(eager, compiled, strict=True):
        _close(a, b, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# bf16 (accelerate's mixed precision)


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one state per process, its mixed precision fixed by the first
    Accelerator: start this test from none and leave none behind."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_bf16_mixed_precision_trains_a_tiny_dense_student_on_cpu(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, set[torch.dtype]] = {"conv": set(), "teachers": set()}
    original = provider.teacher_outputs

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        seen["teachers"] |= {v.dtype for o in out.values() for v in o.values()}
        return out

    monkeypatch.setattr(provider, "teacher_outputs", spy)
    full, _ = _steps(_dense_cfg(tiny_cache, tmp_path), tmp_path / "fp32")
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = _dense_cfg(tiny_cache, tmp_path, "mixed_precision=bf16")
    accelerator, _, phase = _student(cfg, tmp_path / "bf16")
    assert accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu"
    conv = next(m for m in phase.module.student.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: seen["conv"].add(out.dtype))
    ctx, _ = trainer.setup(accelerator, phase)
    ctx.module.train()
    logs = [trainer.train_step(ctx, step) for step in range(2)]
    assert seen == {"conv": {torch.bfloat16}, "teachers": {torch.float32}}
    assert all(torch.isfinite(v).all() for step in logs for v in step.values())
    assert logs[1]["loss"] < logs[0]["loss"]
    relative = abs(float(logs[0]["loss"]) / float(full[0]["loss"]) - 1)
    assert relative < 0.05, relative  # bf16 rounding, not another computation


# --------------------------------------------------------------------------------------------
# The benchmark's options


def test_benchmark_options_time_each_option_against_the_default(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """``--options`` goes through ``term_costs``: one row per option, each with its ratio to the
    default. In this process, without ``compile`` (its compilation is the slow test's) and
    ``bf16`` (accelerate's mixed precision is fixed per process: the script spawns each row)."""
    assert next(iter(OPTION_VARIANTS)) == "default" and not OPTION_VARIANTS["default"]
    names = [n for n in OPTION_VARIANTS if n not in ("compile", "bf16")]
    configs = {n: _dense_cfg(tiny_cache, tmp_path, *OPTION_VARIANTS[n]) for n in names}
    rows = term_costs(configs, steps=1, warmup=0, untrained_teachers=True, spawn=False)
    assert list(rows) == names
    assert rows["default"]["ratio_step"] == pytest.approx(1.0)
    assert all(r["ratio_step"] > 0 and r["device"] == "cpu" for r in rows.values())
    table = format_term_costs(rows)
    assert all(f"| {n} |" in table for n in names)
