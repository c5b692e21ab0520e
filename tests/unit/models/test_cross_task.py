"""Cross-task modules (MTAN masks, DenseMTL exchange): shapes, identity at init, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from unirep.models.cross_task import (
    CROSS_TASK,
    CrossTaskExchange,
    TaskAttentionMasks,
    attention_tokens,
)
from unirep.registry import UnknownNameError

TASKS = ["seg", "depth", "normal"]


def _task_feats(
    tasks: list[str], channels: int, h: int, w: int, batch: int = 2
) -> dict[str, Tensor]:
    return {t: torch.randn(batch, channels, h, w) for t in tasks}


def _perturb_scales(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale"):
                p.fill_(0.5)


def _assert_every_parameter_gets_gradient(module: nn.Module) -> None:
    missing = [
        name
        for name, p in module.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert not missing, f"no gradient for {missing}"


# --------------------------------------------------------------------------------------------
# registry


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("mtan", {"tasks": TASKS, "channels": [8, 16]}, TaskAttentionMasks),
        ("densemtl", {"tasks": TASKS, "channels": 8}, CrossTaskExchange),
    ],
)
def test_registry_builds_by_name(name: str, kwargs: dict, cls: type) -> None:
    assert isinstance(CROSS_TASK.build(name, **kwargs), cls)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(UnknownNameError, match="densemtl, mtan"):
        CROSS_TASK.build("cross_stitch", tasks=TASKS)


# --------------------------------------------------------------------------------------------
# MTAN


@pytest.mark.parametrize(
    ("channels", "sizes"),
    [
        ([8, 16, 32], [(32, 32), (16, 16), (8, 8)]),  # SegNet-like: halves each stage
        ([8, 16, 16], [(24, 40), (12, 20), (12, 20)]),  # dilated last stage: same resolution
        ([4, 8], [(17, 9), (9, 5)]),  # odd sizes
        ([8], [(5, 7)]),  # a single stage
    ],
)
@pytest.mark.parametrize("tasks", [["seg"], TASKS])
def test_mtan_shapes_and_masks_in_open_unit_interval(
    channels: list[int], sizes: list[tuple[int, int]], tasks: list[str]
) -> None:
    module = TaskAttentionMasks(tasks, channels)
    shared = [torch.randn(2, c, h, w) for c, (h, w) in zip(channels, sizes, strict=True)]
    attended, masks = module.forward_with_masks(shared)
    assert set(attended) == set(tasks) == set(masks)
    for task in tasks:
        assert attended[task].shape == (2, channels[-1], *sizes[-1])
        assert len(masks[task]) == len(channels)
        for mask, feat in zip(masks[task], shared, strict=True):
            assert mask.shape == feat.shape
            assert (mask > 0).all() and (mask < 1).all()
    for task, out in module(shared).items():
        torch.testing.assert_close(out, attended[task])


def test_mtan_every_parameter_gets_gradient() -> None:
    module = TaskAttentionMasks(TASKS, [8, 16, 32], reduction=2)
    shared = [torch.randn(2, c, s, s) for c, s in [(8, 16), (16, 8), (32, 4)]]
    sum(out.square().mean() for out in module(shared).values()).backward()
    _assert_every_parameter_gets_gradient(module)


def test_mtan_rejects_wrong_stages() -> None:
    module = TaskAttentionMasks(TASKS, [8, 16])
    with pytest.raises(ValueError, match="expected 2 shared stages"):
        module([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="stage 1"):
        module([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)])


# --------------------------------------------------------------------------------------------
# DenseMTL


@pytest.mark.parametrize("tasks", [TASKS[:2], TASKS, [*TASKS, "edge"]])
@pytest.mark.parametrize(("h", "w"), [(4, 4), (8, 8), (15, 23), (32, 48)])
def test_densemtl_is_identity_at_init(tasks: list[str], h: int, w: int) -> None:
    module = CrossTaskExchange(tasks, channels=8, pool=6, heads=2)
    feats = _task_feats(tasks, 8, h, w)
    out = module(feats)
    assert set(out) == set(tasks)
    for task in tasks:
        assert out[task].shape == feats[task].shape
        assert torch.equal(out[task], feats[task])


def test_densemtl_per_task_sizes_may_differ() -> None:
    module = CrossTaskExchange(TASKS, channels=8, pool=4)
    _perturb_scales(module)
    feats = {"seg": torch.randn(2, 8, 16, 16), "depth": torch.randn(2, 8, 8, 12)}
    feats["normal"] = torch.randn(2, 8, 3, 5)
    out = module(feats)
    assert {t: o.shape for t, o in out.items()} == {t: f.shape for t, f in feats.items()}


@pytest.mark.parametrize("tasks", [TASKS[:2], TASKS])
def test_densemtl_learns_after_scales_move(tasks: list[str]) -> None:
    module = CrossTaskExchange(tasks, channels=8, pool=4, heads=2)
    _perturb_scales(module)
    feats = _task_feats(tasks, 8, 12, 10)
    out = module(feats)
    for task in tasks:
        assert out[task].shape == feats[task].shape
        assert not torch.allclose(out[task], feats[task])
    sum(o.square().mean() for o in out.values()).backward()
    _assert_every_parameter_gets_gradient(module)


def test_densemtl_scales_get_gradient_at_init() -> None:
    module = CrossTaskExchange(TASKS, channels=8)
    out = module(_task_feats(TASKS, 8, 6, 6))
    sum((o * torch.randn_like(o)).sum() for o in out.values()).backward()
    for name, p in module.named_parameters():
        if name.endswith("scale"):
            assert p.grad is not None and p.grad.abs() > 0, name


def test_attention_tokens_is_bounded() -> None:
    assert attention_tokens(3, 5, 8) == 15
    assert attention_tokens(8, 8, 8) == 64
    assert attention_tokens(512, 1024, 8) == 64
    with pytest.raises(ValueError):
        attention_tokens(0, 4, 8)


def test_densemtl_attention_memory_does_not_grow_with_resolution() -> None:
    pool, heads, batch = 4, 2, 2
    module = CrossTaskExchange(TASKS, channels=8, pool=pool, heads=heads)
    _perturb_scales(module)
    shapes: list[torch.Size] = []

    def record(_: nn.Module, __: tuple, attn: Tensor) -> None:
        shapes.append(attn.shape)

    hooks = [m.register_forward_hook(record) for m in module.modules() if isinstance(m, nn.Softmax)]
    n_pairs = len(TASKS) * (len(TASKS) - 1)
    assert len(hooks) == n_pairs
    for h, w in [(4, 4), (16, 16), (64, 96), (129, 67)]:
        shapes.clear()
        module(_task_feats(TASKS, 8, h, w, batch=batch))
        tokens = attention_tokens(h, w, pool)
        assert shapes == [torch.Size([batch, heads, tokens, tokens])] * n_pairs
        assert tokens <= pool * pool
        assert module.attention_bytes(batch, h, w) == batch * heads * tokens**2 * 4
        assert module.attention_bytes(batch, h, w) <= batch * heads * (pool**2) ** 2 * 4
    for hook in hooks:
        hook.remove()


def test_densemtl_rejects_a_task_with_no_source() -> None:
    with pytest.raises(ValueError, match="at least two tasks"):
        CrossTaskExchange(["seg"], channels=8)
    with pytest.raises(ValueError, match="at least two tasks"):
        CROSS_TASK.build("densemtl", tasks=["seg"], channels=8)


def test_densemtl_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="divisible"):
        CrossTaskExchange(TASKS, channels=6, heads=4)
    with pytest.raises(ValueError, match="unique"):
        CrossTaskExchange(["seg", "seg"], channels=8)
    module = CrossTaskExchange(TASKS, channels=8)
    with pytest.raises(ValueError, match="expected features for tasks"):
        module(_task_feats(TASKS[:2], 8, 4, 4))
    with pytest.raises(ValueError, match="'seg'"):
        module({**_task_feats(TASKS, 8, 4, 4), "seg": torch.randn(2, 4, 4, 4)})
