"""The exported backbone loads with timm and gives the student's representation (issue 14).

For every kind of student whose shared backbone is one timm model (a stock timm model, the
decathlon ResNets, the dense SegNet encoder as ``segnet_mtan``), ``export_student`` writes
``backbone/{model.safetensors, config.json}``; ``timm.create_model`` loads it both through
``local-dir:`` and through ``pretrained_cfg_overlay={"file": ...}``, and its output equals
``Student.features``. Students without one say why in the manifest; old exports still load.

Without unirep (issue 22): a stock timm architecture loads by ``local-dir:`` with timm alone;
unirep's own architectures (no stock timm equivalent) come with ``backbone/model.pt2``, a
``torch.export`` program that torch alone runs. Both are checked in a subprocess that cannot
import unirep, against ``Student.features`` here.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import unirep
from unirep.models.build import build_network
from unirep.pipeline.export import (
    BACKBONE_DIR,
    MODEL_CARD,
    STUDENT_MANIFEST,
    TORCH_PROGRAM,
    export_student,
)
from unirep.tasks import TASK_KINDS, Task

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSIFICATION_PRE = {"resize": 36, "crop": 32, "square_resize": False,
                      "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}  # fmt: skip
DENSE_PRE = {"format": "MTAN .npy", "image_size": [32, 48], "label_dir": "label",
             "depth_kind": "depth"}  # fmt: skip


def _classification(backbone: str, **extra: Any) -> tuple[dict, dict, dict]:
    arch = {"backbone": backbone, "backbone_kwargs": {}, "residual_adapters": False, **extra}
    kind = TASK_KINDS.build("classification")
    tasks = {d: Task(d, kind, d, num_classes=k) for d, k in (("digits", 4), ("shapes", 3))}
    return arch, tasks, {d: CLASSIFICATION_PRE for d in tasks}


def _dense(encoder: str, kwargs: dict) -> tuple[dict, dict, dict]:
    arch = {"encoder": encoder, "encoder_kwargs": kwargs, "decoder_channels": 8,
            "cross_task": None, "cross_task_kwargs": {}}  # fmt: skip
    tasks = {
        "semantic": Task("semantic", TASK_KINDS.build("semantic"), "images", num_classes=5),
        "depth": Task("depth", TASK_KINDS.build("depth"), "images"),
        "normal": Task("normal", TASK_KINDS.build("normal"), "images"),
    }
    return arch, tasks, {"images": DENSE_PRE}


def _export(tmp_path: Path, arch: dict, tasks: dict, pre: dict) -> Path:
    torch.manual_seed(0)
    net = build_network(arch, tasks)
    with torch.no_grad():  # non-trivial batch-norm statistics: eval mode must use the saved ones
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    export_student(
        tmp_path, net, preset="test", architecture=arch, tasks=tasks, preprocessing=pre,
        teachers={}, selection={},
    )  # fmt: skip
    return tmp_path


LOADABLE = {
    "resnet_decathlon_tiny": lambda: _classification("resnet_decathlon_tiny"),
    "timm-resnet10t": lambda: _classification("resnet10t"),
    "segnet_mtan": lambda: _dense("segnet", {"width_mult": 0.125}),
}


@pytest.mark.parametrize("case", list(LOADABLE))
def test_the_exported_backbone_loads_in_timm_with_the_students_features(
    tmp_path: Path, case: str
) -> None:
    arch, tasks, pre = LOADABLE[case]()
    folder = _export(tmp_path, arch, tasks, pre)
    manifest = json.loads((folder / STUDENT_MANIFEST).read_text())
    record = manifest["timm_backbone"]
    assert record["folder"] == BACKBONE_DIR
    backbone = folder / BACKBONE_DIR
    config = json.loads((backbone / "config.json").read_text())
    assert config["architecture"] == record["architecture"] and config["num_classes"] == 0

    student = unirep.load_student(folder)
    stream = student.streams[0]
    size = pre[stream].get("image_size") or [pre[stream]["crop"]] * 2
    images = torch.randint(0, 256, (2, 40, 60, 3), dtype=torch.uint8).numpy()  # any size
    expected = student.features(images, stream=stream)
    x = student.preprocess(images, stream)  # what timm's model must be given
    assert x.shape == (2, 3, *size)

    by_file = timm.create_model(
        record["architecture"], pretrained=True, num_classes=0, **record["model_args"],
        pretrained_cfg_overlay={"file": str(backbone / "model.safetensors"), "num_classes": 0},
    ).eval()  # fmt: skip
    by_folder = timm.create_model(f"local-dir:{backbone}", pretrained=True).eval()
    with torch.no_grad():
        for model in (by_file, by_folder):
            got = model.forward_features(x) if "encoder" in arch else model(x)
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-5)
    # timm reads the student's preprocessing from the folder (what its data pipeline would use)
    data = timm.data.resolve_data_config(model=by_folder)
    assert list(data["input_size"]) == [3, *size]
    assert [round(m, 6) for m in data["mean"]] == (
        pre[stream]["mean"] if "mean" in pre[stream] else [0.0, 0.0, 0.0]
    )


# Run with ``python -I -S`` from outside the repository: the interpreter's site-packages are on
# sys.path (torch, timm) but its .pth files, unirep's editable install among them, are not run.
WITHOUT_UNIREP = """
import sys
sys.path.extend(sys.argv[1].split("|"))
try:
    import unirep
except ImportError:
    pass
else:
    raise SystemExit("unirep is importable: " + unirep.__file__)
import torch, timm
backbone, how = sys.argv[2], sys.argv[3]
inputs = torch.load(sys.argv[4])
if how == "timm":
    model = timm.create_model("local-dir:" + backbone, pretrained=True).eval()
else:
    try:
        timm.create_model("local-dir:" + backbone, pretrained=True)
    except RuntimeError as e:
        assert "Unknown model" in str(e), e
    else:
        raise SystemExit("timm knows unirep's architecture")
    model = torch.export.load(backbone + "/model.pt2").module()
with torch.no_grad():
    torch.save([model(x) for x in inputs], sys.argv[5])
assert not any(m == "unirep" or m.startswith("unirep.") for m in sys.modules)
"""


@pytest.mark.parametrize(
    ("case", "how"),
    [("timm-resnet10t", "timm"), ("resnet_decathlon_tiny", "torch"), ("segnet_mtan", "torch")],
)
def test_the_exported_backbone_loads_without_unirep(tmp_path: Path, case: str, how: str) -> None:
    arch, tasks, pre = LOADABLE[case]()
    folder = _export(tmp_path / "student", arch, tasks, pre)
    record = json.loads((folder / STUDENT_MANIFEST).read_text())["timm_backbone"]
    backbone = folder / BACKBONE_DIR
    program = backbone / TORCH_PROGRAM
    if how == "timm":  # timm builds a stock architecture itself: no program
        assert record["program"] is None and not program.exists()
    else:
        assert record["program"]["file"] == TORCH_PROGRAM
        assert record["program"]["sha256"] == hashlib.sha256(program.read_bytes()).hexdigest()
        config = json.loads((backbone / "config.json").read_text())
        assert config["unirep"]["program"] == record["program"]

    student = unirep.load_student(folder)
    stream = student.streams[0]
    images = torch.randint(0, 256, (2, 40, 60, 3), dtype=torch.uint8).numpy()
    size = student.preprocess(images, stream).shape[-2:]
    # the student's input, then another batch and image size (the program's shapes are dynamic)
    inputs = [student.preprocess(images, stream), torch.rand(1, 3, size[0] + 32, size[1] + 8)]
    expected = [student.features(x, stream=stream, preprocessed=True) for x in inputs]
    torch.save(inputs, tmp_path / "inputs.pt")

    site = "|".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    script = [sys.executable, "-I", "-S", "-c", WITHOUT_UNIREP, site, str(backbone), how]
    outside = tmp_path / "elsewhere"  # no unirep/ in the working directory either
    outside.mkdir()
    done = subprocess.run(
        [*script, str(tmp_path / "inputs.pt"), str(tmp_path / "got.pt")],
        cwd=outside, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert torch.allclose(g, e, atol=1e-5)


def test_a_new_head_for_fine_tuning_keeps_the_trained_backbone(tmp_path: Path) -> None:
    arch, tasks, pre = _classification("resnet_decathlon_tiny")
    backbone = _export(tmp_path, arch, tasks, pre) / BACKBONE_DIR
    plain = timm.create_model(f"local-dir:{backbone}", pretrained=True).eval()
    tuned = timm.create_model(
        "resnet_decathlon_tiny", pretrained=True, num_classes=10,
        pretrained_cfg_overlay={"file": str(backbone / "model.safetensors"), "num_classes": 0},
    ).eval()  # fmt: skip
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert tuned(x).shape == (2, 10)
        assert torch.allclose(tuned.forward_head(tuned.forward_features(x), pre_logits=True),
                              plain(x), atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _classification("resnet_decathlon_tiny", residual_adapters=True), "residual"),
        (lambda: _dense("timm", {"model_name": "resnet10t"}), "features_only"),
    ],
    ids=["residual-adapters", "dense-timm-encoder"],
)
def test_students_without_one_timm_backbone_say_why(tmp_path: Path, make, reason: str) -> None:
    arch, tasks, pre = make()
    folder = _export(tmp_path, arch, tasks, pre)
    record = json.loads((folder / STUDENT_MANIFEST).read_text())["timm_backbone"]
    assert record["folder"] is None and reason in record["reason"]
    assert not (folder / BACKBONE_DIR).exists()
    student = unirep.load_student(folder)  # the student itself still loads and runs
    stream = student.streams[0]
    size = pre[stream].get("image_size") or [32, 32]
    assert student.features(torch.rand(1, 3, *size), stream=stream).dim() in (2, 4)


def test_unirep_architectures_refuse_pretrained_without_a_file() -> None:
    for name in ("resnet26_decathlon", "resnet_decathlon_tiny", "segnet_mtan"):
        with pytest.raises(ValueError, match="no pretrained weights are shipped"):
            timm.create_model(name, pretrained=True)


def test_an_export_without_backbone_or_card_still_loads(tmp_path: Path) -> None:
    """An export written before the backbone and the card (issue 14) loads as before."""
    arch, tasks, pre = _classification("resnet_decathlon_tiny")
    folder = _export(tmp_path, arch, tasks, pre)
    manifest = json.loads((folder / STUDENT_MANIFEST).read_text())
    del manifest["timm_backbone"]
    (folder / STUDENT_MANIFEST).write_text(json.dumps(manifest))
    for path in sorted((folder / BACKBONE_DIR).iterdir()):
        path.unlink()
    (folder / BACKBONE_DIR).rmdir()
    assert not (folder / MODEL_CARD).exists()
    student = unirep.load_student(folder)
    assert student.predict(torch.rand(2, 3, 40, 40), task="digits").shape == (2,)
