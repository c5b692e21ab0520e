"""``alternating`` (Pascal et al., MTL-IUS): random task groups, one optimizer step per group on
each batch, against a hand-written loop over the same batch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import fit_interrupted, tiny_dense_config
from unirep.errors import ConfigError
from unirep.pipeline.rundir import make_accelerator
from unirep.pipeline.validate import load_config
from unirep.weighting import build_weighting


def test_groups_are_a_seeded_random_partition() -> None:
    tasks = ["a", "b", "c", "d", "e"]
    pairs = build_weighting("alternating", tasks, group_size=2, seed=3).update_groups()
    assert [len(g) for g in pairs] == [2, 2, 1]
    assert sorted(t for g in pairs for t in g) == tasks
    assert build_weighting("alternating", tasks, group_size=2, seed=3).update_groups() == pairs
    draws = {str(build_weighting("alternating", tasks, seed=s).update_groups()) for s in range(6)}
    assert len(draws) > 1  # the order depends on the seed
    assert build_weighting("alternating", tasks, group_size=5).update_groups() == [
        sorted(tasks, key=lambda t: [*build_weighting("alternating", tasks,
                                                      group_size=5).update_groups()[0]].index(t))
    ]  # fmt: skip
    state = build_weighting("alternating", tasks, seed=3).state_dict()
    assert set(state) == {"order"}
    with pytest.raises(ValueError, match="group_size"):
        build_weighting("alternating", tasks, group_size=6)


def test_config_refuses_accumulation_and_tells_ddp_about_unused_parameters() -> None:
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps.*alternating"):
        load_config("mini-scenes", ["weighting.name=alternating",
                                    "train.gradient_accumulation_steps=2"])  # fmt: skip
    cfg = load_config("mini-scenes", ["weighting={name: alternating, kwargs: {group_size: 2}}"])
    handlers = make_accelerator(cfg).ddp_handler
    assert handlers is not None and handlers.find_unused_parameters


def test_each_group_steps_in_turn_on_the_same_batch(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``train_step`` equals: for each group, forward the batch with the parameters the
    previous group left, back-propagate the group's summed losses, step the optimizer; the
    other tasks' heads keep their weights and moments."""
    from accelerate import Accelerator

    import unirep.training.trainer as trainer_module
    from unirep.pipeline.stage_two import resolve_data, student_phase

    torch.set_num_threads(1)
    cfg = tiny_dense_config(tiny_cache, tmp_path, "weighting={name: alternating, kwargs: "
                            "{group_size: 1, seed: 1}}")  # fmt: skip
    accelerator = Accelerator(cpu=True)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
    phase, _ = student_phase(
        cfg, accelerator, "baseline", data, tasks, tmp_path, {}, reference, False
    )
    ctx, _ = trainer_module.setup(accelerator, phase)
    batches = []
    real = trainer_module.make_batch
    monkeypatch.setattr(trainer_module, "make_batch", lambda *a: batches.append(real(*a)) or
                        batches[-1])  # fmt: skip
    module, optimizer = copy.deepcopy((ctx.unwrapped, ctx.optimizers[0].optimizer))
    groups = module.weighting.update_groups()
    assert len(groups) == 3 and all(len(g) == 1 for g in groups)
    trainer_module.train_step(ctx, 0)
    (batch,) = batches

    heads_before = {n: p.detach().clone() for n, p in module.named_parameters() if ".heads." in n}
    first_step = {}
    for k, group in enumerate(groups):
        bundle = module(batch, None, 0, cfg.train.max_steps).only(group)
        bundle.total().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k == 0:
            first_step = {n: p.detach().clone() for n, p in module.named_parameters()}
    for (name, got), want in zip(
        ctx.unwrapped.state_dict().items(), module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    # after the first group's step, the other tasks' heads had not moved
    first = groups[0][0]
    for name, before in heads_before.items():
        if f".heads.{first}." not in name:
            assert torch.equal(first_step[name], before), name
    mine = [n for n in heads_before if f".heads.{first}." in n]
    assert mine and any(not torch.equal(first_step[n], heads_before[n]) for n in mine)


@pytest.mark.slow
def test_an_alternating_run_resumes_bit_exactly(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    extra = ["weighting={name: alternating, kwargs: {group_size: 2}}", "train.max_steps=4",
             "train.checkpoint_every=2", "train.log_every=1"]  # fmt: skip
    results = []
    for crash in (None, 3):
        folder = tmp_path / f"crash{crash}"
        cfg = tiny_dense_config(tiny_cache, folder, *extra)
        phase, _ = fit_interrupted(cfg, folder, "baseline", crash, monkeypatch)
        log = (folder / "logs" / "baseline.csv").read_text()
        results.append(({k: v.clone() for k, v in phase.module.state_dict().items()}, log))
    (whole, log_a), (resumed, log_b) = results
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
    assert log_a == log_b
