"""Shared fixtures: a tiny generated benchmark and configs that train in seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share two cores: one thread each
    torch.set_num_threads(1)

from unirep.config.schema import Config
from unirep.pipeline.validate import load_config

TINY = [
    "data.generator={seed: 0, image_size: 32, scale: 0.1}",
    "classification.domains=[digits, objects, textures]",
    "data.batch_size=8",
    "data.eval_batch_size=64",
    "teachers.train.max_steps=6",
    "teachers.train.eval_every=3",
    "teachers.train.checkpoint_every=3",
    "teachers.train.log_every=2",
    "classification.finetune_train.max_steps=4",
    "classification.finetune_train.eval_every=2",
    "classification.finetune_train.checkpoint_every=2",
    "classification.finetune_train.log_every=2",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "progress=false",
]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir shared by the session (the generated tiny benchmark lives there)."""
    return tmp_path_factory.mktemp("unirep-cache")


def tiny_config(cache: Path, out: Path, *extra: str) -> Config:
    """The mini-decathlon preset shrunk to a few images and steps."""
    return load_config(
        "mini-decathlon",
        [*TINY, f"data.cache_dir={cache}", f"output_dir={out}", *extra],
    )


TINY_DENSE = [
    "data.generator={seed: 0, height: 32, width: 48, scale: 0.05}",  # 12 / 3 / 6 scenes
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "dense.encoder.kwargs={width_mult: 0.125}",
    "dense.decoder_channels=8",
    "teachers.train.max_steps=20",  # enough for non-zero test scores (Δm divides by them)
    "teachers.train.eval_every=10",
    "teachers.train.checkpoint_every=10",
    "teachers.train.log_every=5",
    "teachers.train.optim.optimizer.kwargs={lr: 0.01}",
    "train.max_steps=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "progress=false",
]


def tiny_dense_config(cache: Path, out: Path, *extra: str, preset: str = "mini-scenes") -> Config:
    """A dense preset shrunk to a few small images and steps."""
    return load_config(
        preset,
        [*TINY_DENSE, f"data.cache_dir={cache}", f"output_dir={out}", *extra],
    )


def fit_interrupted(cfg: Config, run_dir: Path, role: str, crash_at: int | None, monkeypatch):
    """Fit ``role`` (``baseline`` or ``student``, no teachers) of ``cfg`` in ``run_dir``; with
    ``crash_at``, interrupted before that step first and then resumed. Returns (phase, result)."""
    from accelerate import Accelerator

    import unirep.training.trainer as trainer_module
    from unirep.pipeline.stage_two import resolve_data, student_phase
    from unirep.training.evaluator import Evaluator

    accelerator = Accelerator(cpu=True)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size)
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}  # stands in for teachers
    distill = role == "student"
    real = trainer_module.train_step

    def crashing(ctx, step, timings=None):
        if step == crash_at:
            raise KeyboardInterrupt
        return real(ctx, step, timings)

    if crash_at is not None:
        monkeypatch.setattr(trainer_module, "train_step", crashing)
        phase, _ = student_phase(
            cfg, accelerator, role, data, tasks, run_dir, {}, reference, distill
        )
        with pytest.raises(KeyboardInterrupt):
            trainer_module.fit(accelerator, phase, evaluator, progress=False)
        monkeypatch.setattr(trainer_module, "train_step", real)
    phase, _ = student_phase(cfg, accelerator, role, data, tasks, run_dir, {}, reference, distill)
    return phase, trainer_module.fit(accelerator, phase, evaluator, progress=False)


def random_dense_batch(
    b: int, h: int, w: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[dict, dict, torch.Generator]:
    """Random predictions (``seg`` 4 classes, ``depth``, unit ``normal``) and targets with about
    a fifth of the pixels invalid, for loss tests; the generator, to draw more from it."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, 1, h, w, generator=g) > 0.2
    preds = {
        "seg": torch.randn(b, 4, h, w, generator=g, dtype=dtype),
        "depth": torch.rand(b, 1, h, w, generator=g, dtype=dtype) * 5,
        "normal": F.normalize(torch.randn(b, 3, h, w, generator=g, dtype=dtype), dim=1),
    }
    normal = F.normalize(torch.randn(b, 3, h, w, generator=g, dtype=dtype), dim=1)
    targets = {
        "seg": torch.randint(-1, 4, (b, h, w), generator=g),
        "depth": (torch.rand(b, 1, h, w, generator=g, dtype=dtype) * 5 + 0.1) * valid,
        "normal": normal * valid,
    }
    return preds, targets, g


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest and immune to a busy machine (a module's
    tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
