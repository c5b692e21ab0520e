"""Dense multi-task networks: encoders, shapes per cross-task option, gradients, export, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from unirep.io import load_weights
from unirep.models.build import build_network
from unirep.models.dense import (
    DENSE_ENCODERS,
    DenseMultiTaskNet,
    SegNetEncoder,
    TimmDenseEncoder,
    build_dense_encoder,
    build_dense_network,
)
from unirep.objective import Objective
from unirep.pipeline.export import export_student, load_student
from unirep.registry import UnknownNameError
from unirep.tasks import TASK_KINDS, Task
from unirep.training.trainable import TrainableModule
from unirep.weighting import build_weighting

TASKS = {"semantic": 13, "depth": 1, "normal": 3}
H, W = 48, 64
SEGNET: tuple[str, dict[str, Any]] = ("segnet", {"width_mult": 0.25})
TIMM: tuple[str, dict[str, Any]] = ("timm", {"model_name": "mobilenetv3_small_050"})


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, H, W)


# --------------------------------------------------------------------------------------------
# encoders


def test_segnet_encoder_stages() -> None:
    enc = SegNetEncoder(width_mult=0.25)
    assert enc.channels == [16, 32, 64, 128, 128]
    assert enc.reductions == [2, 4, 8, 16, 32]
    feats, indices = enc.forward_with_indices(_images())
    assert [tuple(f.shape) for f in feats] == [
        (2, 16, 24, 32),
        (2, 32, 12, 16),
        (2, 64, 6, 8),
        (2, 128, 3, 4),
        (2, 128, 1, 2),
    ]
    assert [i.shape for i in indices] == [f.shape for f in feats]
    full = SegNetEncoder()
    assert full.channels == [64, 128, 256, 512, 512]
    assert sum(len(s) for s in full.stages) == 13  # 13 conv blocks, as VGG-16/SegNet


def test_segnet_rejects_too_small_inputs() -> None:
    with pytest.raises(ValueError, match="H, W >= 32"):
        SegNetEncoder(width_mult=0.25)(torch.randn(1, 3, 16, 64))


def test_timm_encoder_channels_and_reductions_match_outputs() -> None:
    enc = build_dense_encoder("timm", model_name="mobilenetv3_small_050", out_indices=[1, 2, 3, 4])
    assert isinstance(enc, TimmDenseEncoder)
    feats = enc(_images())
    assert [f.shape[1] for f in feats] == enc.channels
    assert [W // f.shape[3] for f in feats] == enc.reductions == [4, 8, 16, 32]


def test_pretrained_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        build_dense_encoder("timm", model_name="resnet10t", pretrained=True)
    with pytest.raises(ValueError, match="pretrained"):
        build_dense_network("timm", {"model_name": "resnet10t", "pretrained": True}, TASKS)


def test_unknown_names_list_choices() -> None:
    with pytest.raises(UnknownNameError, match="segnet, timm"):
        build_dense_network("unet", {}, TASKS)
    assert DENSE_ENCODERS.names() == ["segnet", "timm"]
    with pytest.raises(UnknownNameError, match="densemtl, mtan"):
        build_dense_network(*SEGNET, TASKS, cross_task="cross_stitch")
    with pytest.raises(UnknownNameError, match="not_a_model"):
        build_dense_encoder("timm", model_name="not_a_model")


def test_bad_arguments_fail_early() -> None:
    with pytest.raises(KeyError, match="edges"):
        build_dense_network(*SEGNET, TASKS, unit_vector=["edges"])
    with pytest.raises(KeyError, match="edges"):
        build_dense_network(*SEGNET, TASKS).build_aligners({"edges": 8})
    with pytest.raises(ValueError, match="without cross_task"):
        build_dense_network(*SEGNET, TASKS, cross_task_kwargs={"pool": 4})
    with pytest.raises(ValueError, match="two tasks"):
        build_dense_network(*SEGNET, {"depth": 1}, cross_task="densemtl")
    with pytest.raises(TypeError, match="channels"):
        DenseMultiTaskNet(nn.Conv2d(3, 8, 3), TASKS)


# --------------------------------------------------------------------------------------------
# the network


def _aligned(aligners: nn.ModuleDict, out: dict[str, dict[str, torch.Tensor]]) -> dict:
    return {t: aligners[t](out[t]) for t in aligners}


@pytest.mark.parametrize("encoder", [SEGNET, TIMM], ids=["segnet", "timm"])
@pytest.mark.parametrize("cross_task", [None, "mtan", "densemtl"])
def test_output_shapes(encoder: tuple[str, dict[str, Any]], cross_task: str | None) -> None:
    align = {"semantic": 8, "depth": 8, "normal": 16}
    net = build_dense_network(*encoder, TASKS, decoder_channels=16, cross_task=cross_task)
    aligners = net.build_aligners(align)
    enc = net.encoder
    out = net(_images())
    aligned = _aligned(aligners, out)
    assert set(out) == set(TASKS) == set(aligned)
    h0, w0 = H // enc.reductions[0], W // enc.reductions[0]
    for task, k in TASKS.items():
        o = out[task]
        assert set(o) == {"pred", "features", "bottleneck"}
        assert o["pred"].shape == (2, k, H, W)
        assert o["features"].shape == (2, 16, h0, w0)
        assert o["bottleneck"].shape[:2] == (2, enc.channels[-1])
        a_bottleneck, a_features = aligned[task]
        assert a_bottleneck.shape == (2, align[task], *o["bottleneck"].shape[-2:])
        assert a_features.shape == (2, align[task], h0, w0)
        assert all(torch.isfinite(v).all() for v in [*o.values(), a_bottleneck, a_features])
    # a dict of one stream and the bare tensor give the same outputs; two streams are refused
    net.eval()
    x = _images()
    with torch.no_grad():
        by_stream, by_tensor = net({"images": x}), net(x)
    for task in TASKS:
        torch.testing.assert_close(by_stream[task]["pred"], by_tensor[task]["pred"])
    with pytest.raises(ValueError, match="one image stream"):
        net({"a": x, "b": x})


def test_normals_are_unit_length_and_others_raw() -> None:
    net = build_dense_network(*SEGNET, TASKS, decoder_channels=8, unit_vector=["normal"]).eval()
    with torch.no_grad():
        out = net(_images())
    norms = out["normal"]["pred"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert out["depth"]["pred"].min() < 0 or out["depth"]["pred"].max() > 1  # not squashed
    assert set(out["depth"]) == {"pred", "features", "bottleneck"}  # no adapters in the net
    # the unit-vector tasks are the ones named (the task kind decides), not "normal" by name
    raw = build_dense_network(*SEGNET, TASKS, decoder_channels=8).eval()
    with torch.no_grad():
        raw_norms = raw(_images())["normal"]["pred"].norm(dim=1)
    assert not torch.allclose(raw_norms, torch.ones_like(raw_norms))


@pytest.mark.parametrize("encoder", [SEGNET, TIMM], ids=["segnet", "timm"])
@pytest.mark.parametrize("cross_task", [None, "mtan", "densemtl"])
def test_every_parameter_gets_gradient(
    encoder: tuple[str, dict[str, Any]], cross_task: str | None
) -> None:
    net = build_dense_network(*encoder, TASKS, decoder_channels=8, cross_task=cross_task)
    aligners = net.build_aligners({t: 4 for t in TASKS})
    with torch.no_grad():  # DenseMTL's zero-initialised scales would block its inner gradients
        for name, p in net.named_parameters():
            if name.endswith("scale"):
                p.fill_(0.5)
    out = net(_images())
    aligned = _aligned(aligners, out)
    loss = sum(v.square().mean() for o in out.values() for v in o.values())
    loss = loss + sum(v.square().mean() for a in aligned.values() for v in a)
    loss.backward()
    params = [
        *net.named_parameters(),
        *(("aligners." + n, p) for n, p in aligners.named_parameters()),
    ]
    missing = [
        name
        for name, p in params
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert not missing, f"no gradient for {missing}"
    assert any(".bottleneck." in n for n, _ in params)
    assert len(list(aligners.parameters())) == 2 * len(TASKS)  # two bias-free 1x1 convs per task


@pytest.mark.parametrize("cross_task", [None, "mtan", "densemtl"])
def test_export_state_drops_adapters_and_loads_strictly(
    cross_task: str | None, tmp_path: Path
) -> None:
    tasks = {
        name: Task(name, TASK_KINDS.build(name), "images", k if name == "semantic" else None)
        for name, k in TASKS.items()
    }
    arch = {
        "encoder": SEGNET[0],
        "encoder_kwargs": SEGNET[1],
        "decoder_channels": 8,
        "cross_task": cross_task,
        "cross_task_kwargs": {},
    }
    student = build_network(arch, tasks)
    module = TrainableModule(
        student,
        Objective(tasks),
        build_weighting("sum", list(tasks)),
        student.build_aligners({"depth": 8}),
    )
    export_student(
        tmp_path, module.student, preset="test", architecture=arch, tasks=tasks,
        preprocessing={}, teachers={}, selection={},
    )  # fmt: skip
    state = load_weights(tmp_path / "model.safetensors")
    assert not [k for k in state if "align" in k]
    assert len(state) < len(module.state_dict())
    assert any(k.startswith("aligners.depth.") for k in module.state_dict())
    plain = build_dense_network(
        *SEGNET, TASKS, decoder_channels=8, cross_task=cross_task, unit_vector=["normal"]
    )
    plain.load_state_dict(state, strict=True)
    loaded, manifest = load_student(tmp_path)  # strict, hash-checked
    assert manifest["architecture"] == arch and loaded.tasks == list(TASKS)
    student.eval()
    plain.eval()
    x = _images()
    with torch.no_grad():
        expected, got, again = student(x), plain(x), loaded({"images": x})
    for task in TASKS:
        torch.testing.assert_close(got[task]["pred"], expected[task]["pred"])
        torch.testing.assert_close(again[task]["pred"], expected[task]["pred"])


@pytest.mark.parametrize("encoder", [SEGNET, TIMM], ids=["segnet", "timm"])
def test_single_task_teacher(encoder: tuple[str, dict[str, Any]]) -> None:
    teacher = build_dense_network(*encoder, {"depth": 1}, decoder_channels=16)
    assert teacher.tasks == ["depth"]
    out = teacher(_images())
    assert set(out) == {"depth"}
    assert out["depth"]["pred"].shape == (2, 1, H, W)
    # the teacher's last decoder feature is what the student's adapters are matched to
    assert teacher.feature_dim == out["depth"]["features"].shape[1]
    student = build_dense_network(*SEGNET, TASKS, decoder_channels=8)
    aligners = student.build_aligners({"depth": teacher.feature_dim})
    assert set(aligners) == {"depth"}
    _, s_features = aligners["depth"](student(_images())["depth"])
    assert s_features.shape[1] == out["depth"]["features"].shape[1]
    mtan_teacher = build_dense_network(*SEGNET, {"normal": 3}, cross_task="mtan")
    assert mtan_teacher(_images())["normal"]["pred"].shape == (2, 3, H, W)
