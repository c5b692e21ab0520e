"""Mixup on a batch (unirep.batch.mix_batch), its labels in the task loss, where it is refused,
and a real student step: the teachers see the mixed images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import tiny_config
from unirep.batch import Batch, mix_batch
from unirep.errors import ConfigError
from unirep.objective import masked_loss, mixed_loss
from unirep.pipeline.validate import load_config
from unirep.training.validation import check_config


def _batch() -> Batch:
    inputs = {"a": torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2),
              "b": torch.randn(5, 3, 2, 2), "one": torch.randn(1, 3, 2, 2)}  # fmt: skip
    targets = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.tensor([1, 0, 1, 1, 0])}
    masks = {t: torch.ones(len(y), dtype=torch.bool) for t, y in targets.items()}
    return Batch(inputs, targets, masks)


def test_mix_batch_mixes_each_stream_with_a_permutation_of_itself() -> None:
    batch = _batch()
    mixed = mix_batch(batch, 0.4, (7, 3, 0, 0))
    assert set(mixed.mix) == {"a", "b"}  # a stream of one sample stays as it is
    assert torch.equal(mixed.inputs["one"], batch.inputs["one"])
    for stream, (perm, lam) in mixed.mix.items():
        x = batch.inputs[stream]
        assert sorted(perm.tolist()) == list(range(len(x))) and 0.0 <= lam <= 1.0
        torch.testing.assert_close(mixed.inputs[stream], lam * x + (1 - lam) * x[perm])
    # the original batch is left alone, the targets are not touched (the loss mixes them)
    assert not batch.mix and mixed.targets is batch.targets
    # a pure function of the draw: the same draw mixes the same way, another draw differently
    again = mix_batch(_batch(), 0.4, (7, 3, 0, 0))
    assert all(torch.equal(again.mix[s][0], mixed.mix[s][0]) for s in mixed.mix)
    assert again.mix["a"][1] == mixed.mix["a"][1]
    lams = {mix_batch(_batch(), 0.4, (7, step, 0, 0)).mix["a"][1] for step in range(20)}
    assert len(lams) == 20

    # λ ~ Beta(α, α): with α = 0.2 most draws are near 0 or 1 (the mean of min(λ, 1 − λ) is
    # about 0.14), with α = 1 uniform (mean 0.25)
    def mean_min(alpha: float) -> float:
        values = [mix_batch(_batch(), alpha, (0, s, 0, 0)).mix["b"][1] for s in range(400)]
        return float(np.mean([min(v, 1 - v) for v in values]))

    assert mean_min(0.2) < 0.19 < 0.21 < mean_min(1.0)
    # it travels with the batch to a device
    moved = mixed.to(torch.device("cpu"))
    assert moved.mix["a"][1] == mixed.mix["a"][1] and torch.equal(moved.mix["a"][0], perm_a(mixed))


def perm_a(batch: Batch) -> torch.Tensor:
    return batch.mix["a"][0]


def test_mixed_loss_mixes_the_labels_as_the_inputs() -> None:
    ce = nn.CrossEntropyLoss()
    pred = torch.randn(4, 3, requires_grad=True)
    target, mask = torch.tensor([0, 1, 2, 0]), torch.ones(4, dtype=torch.bool)
    assert torch.equal(
        mixed_loss(ce, pred, target, mask, None), masked_loss(ce, pred, target, mask)
    )
    perm = torch.tensor([2, 0, 3, 1])
    got = mixed_loss(ce, pred, target, mask, (perm, 0.3))
    # per sample: 0.3 · CE(ŷ_i, y_i) + 0.7 · CE(ŷ_i, y_perm[i])
    log_p = torch.log_softmax(pred, dim=1)
    expected = -(0.3 * log_p[torch.arange(4), target] + 0.7 * log_p[torch.arange(4), target[perm]])
    torch.testing.assert_close(got, expected.mean())


def test_mixup_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    # found at start-up (load_config runs every check), in one line naming the key
    with pytest.raises(ConfigError, match=r"'train\.mixup'.*classification runs only"):
        load_config("mini-scenes", ["train.mixup=0.2"])
    with pytest.raises(ConfigError, match=r"'teachers\.train\.mixup'.*classification runs only"):
        load_config("mini-scenes", ["teachers.train.mixup=0.2"])
    with pytest.raises(ConfigError, match=r"'train\.mixup'.*teachers\.output_cache\.draws=0"):
        load_config("mini-decathlon", ["train.mixup=0.2", "teachers.output_cache.draws=2"])
    check_config(load_config("mini-decathlon", ["train.mixup=0.2"]))  # online teachers: fine
    # the baseline alone reads no teacher output: the cache does not matter
    load_config("mini-decathlon", ["train.mixup=0.2", "teachers.output_cache.draws=2",
                                   "distill.enabled=false"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.mixup.*>= 0"):
        load_config("mini-decathlon", ["train.mixup=-1"])


def test_a_student_step_with_mixup_shows_the_teachers_the_mixed_images(
    tiny_cache: Path, tmp_path: Path
) -> None:
    from unirep.experiments.benchmark import random_teachers
    from unirep.pipeline.rundir import make_accelerator
    from unirep.pipeline.stage_two import resolve_data, student_phase
    from unirep.training import trainer

    cfg = tiny_config(tiny_cache, tmp_path, "cpu=true", "train.mixup=0.4")
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
    teachers = random_teachers(cfg, data)
    phase, _ = student_phase(
        cfg, accelerator, "student", data, tasks, tmp_path, teachers, reference, True
    )
    ctx, _ = trainer.setup(accelerator, phase)
    seen: list[Batch] = []
    provide = ctx.teachers
    assert provide is not None

    def spy(batch: Batch) -> dict:
        seen.append(batch)
        return provide(batch)

    ctx.teachers = spy  # type: ignore[assignment]
    ctx.module.train()
    logs = trainer.train_step(ctx, 0)
    assert all(torch.isfinite(v).all() for v in logs.values())
    (batch,) = seen
    assert set(batch.mix) == {s for s, x in batch.inputs.items() if len(x) > 1}
    # the mix is the one the draw (seed, step, micro-batch, process) gives
    perm, lam = mix_batch(batch, 0.4, (cfg.seed, 0, 0, 0)).mix[next(iter(batch.mix))]
    stream = next(iter(batch.mix))
    assert torch.equal(batch.mix[stream][0], perm) and batch.mix[stream][1] == lam


def test_teacher_keys_do_not_change_without_mixup(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe without mixup hashes as 0.4 did (no ``mixup`` entry: cached teachers are found
    again); a recipe with mixup is another teacher."""
    import unirep.stage_one.keys as keys

    from unirep.pipeline.rundir import make_accelerator
    from unirep.pipeline.stage_two import resolve_data

    cfg = tiny_config(tiny_cache, tmp_path, "cpu=true")
    data = resolve_data(cfg, make_accelerator(cfg))
    task = next(iter(data.tasks()))
    key = keys.teacher_key(cfg, data, task)
    mixed = tiny_config(tiny_cache, tmp_path, "cpu=true", "teachers.train.mixup=0.2",
                        "classification.finetune_train.mixup=0.2")  # fmt: skip
    assert keys.teacher_key(mixed, data, task) != key
    to_dict = keys.to_dict

    def without_mixup(value: Any) -> Any:  # what 0.4, which had no such key, hashed
        out = to_dict(value)
        return {k: v for k, v in out.items() if k != "mixup"} if isinstance(out, dict) else out

    monkeypatch.setattr(keys, "to_dict", without_mixup)
    assert keys.teacher_key(cfg, data, task) == key
