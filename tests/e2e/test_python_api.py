"""The Python API end to end (issue 14): the README's example, run on a tiny run.

:data:`EXAMPLE` is the README's "Python API" example, character for character; the test runs it
with the tiny settings of the other end-to-end tests in place of its one line of overrides (the
README's own run takes minutes). Then, on the student it trained: predictions agree with the
network, ``evaluate`` gives the run's own test metrics, the timm backbone the student's
features, and the model card holds the run's facts and a command that gives its config back.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY
from unirep.config.load import to_dict
from unirep.pipeline.model_card import NOT_REPRODUCING
from unirep.pipeline.validate import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

OVERRIDES_LINE = 'overrides = ["name=api-example"]  # e.g. "train.max_steps=100", "seed=1"'
API_PAGE = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
API_HEADING = re.compile(r"^#{1,2} Python API$", re.M)


def _readme_example() -> str:
    """The first ``python`` block of the "Python API" page (``docs/python-api.md``), after its
    "Python API" heading."""
    text = API_PAGE.read_text(encoding="utf-8")
    heading = API_HEADING.search(text)
    section = text[heading.end() :] if heading else text
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


EXAMPLE = _readme_example()


@pytest.fixture(scope="module")
def example(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The README's example, run with tiny overrides; its variables."""
    out = tmp_path_factory.mktemp("api")
    tiny = ["name=api-example", *TINY, f"data.cache_dir={tiny_cache}", f"output_dir={out}"]
    assert EXAMPLE.count(OVERRIDES_LINE) == 1
    code = EXAMPLE.replace(OVERRIDES_LINE, f"overrides = {tiny!r}")
    namespace: dict[str, Any] = {}
    exec(compile(code, "README example", "exec"), namespace)
    return namespace


def test_the_readme_example_runs(example: dict[str, Any]) -> None:
    student, result = example["student"], example["result"]
    assert (result.directory / "metrics.json").is_file() and not result.already_finished
    assert student.streams == ["digits", "objects", "textures"]
    assert set(example["labels"]) == set(student.tasks)
    for task, labels in example["labels"].items():
        assert labels.shape == (4,) and labels.dtype == torch.int64
        assert int(labels.max()) < student.tasks[task].num_classes
    assert torch.equal(example["digits"], example["labels"]["digits"])
    assert example["features"].shape == (4, student.manifest["feature_dim"])
    assert torch.allclose(example["same"], example["features"], atol=1e-5)


def test_predictions_are_the_networks_on_the_preprocessed_images(example: dict[str, Any]) -> None:
    """PIL images, uint8 arrays and float tensors in [0, 1] preprocess alike (the dataset's
    evaluation transform); ``predict`` is the argmax of the network's logits."""
    student, images = example["student"], example["images"]
    pil = [Image.fromarray(x) for x in images]
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = student.preprocess(images, "objects")
    assert x.shape == (4, 3, 28, 28)  # the manifest's crop
    torch.testing.assert_close(student.preprocess(pil, "objects"), x)
    # uint8 images are resized in uint8: to one grey level, normalised by the stream's std
    grey = 1.01 / 255 / min(student.preprocessing["objects"]["std"])
    torch.testing.assert_close(student.preprocess(floats, "objects"), x, atol=grey, rtol=0)
    with torch.no_grad():
        logits = student({"objects": x})["objects"]["pred"]
    assert torch.equal(student.predict(x, task="objects", preprocessed=True), logits.argmax(1))
    assert torch.equal(student.predict(pil, task="objects"), logits.argmax(1))
    with pytest.raises(ValueError, match="several streams"):
        student.features(images)
    with pytest.raises(KeyError, match="unknown task"):
        student.predict(images, task="nope")


def test_evaluate_gives_the_runs_own_test_metrics(example: dict[str, Any]) -> None:
    run_metrics = json.loads((example["result"].directory / "metrics.json").read_text())
    expected = {t: entry["student"] for t, entry in run_metrics["tasks"].items()}
    assert example["metrics"] == expected


def test_the_model_card_holds_the_runs_facts(example: dict[str, Any]) -> None:
    folder = example["result"].student
    card = (folder / "README.md").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    metrics = example["result"].metrics
    for teacher in manifest["teachers"].values():
        assert f"`{teacher['weights_sha256']}`" in card and f"`{teacher['key']}`" in card
    assert f"sha256 `{manifest['weights_sha256']}`" in card
    assert manifest["timm_backbone"]["weights_sha256"] in card
    assert "## Data" in card and "source: `synthetic-decathlon`" in card
    assert "## Metrics (test split)" in card and "model selection on the `val` split" in card
    for task, entry in metrics["tasks"].items():
        row = f"| {task} | accuracy | {entry['student']['accuracy']:.4f} | "
        assert row + f"{entry['teacher']['accuracy']:.4f} |" in card
    assert "seconds" not in card
    command = card.split("```sh\n", 1)[1].split("\n```", 1)[0]
    words = shlex.split(command)
    assert words[:5] == ["accelerate", "launch", "scripts/distill.py", "--config", "mini-decathlon"]
    saved = load_config(str(example["result"].directory / "config.yaml"))

    def reproducing(cfg: Any) -> dict:
        return {k: v for k, v in to_dict(cfg).items() if k not in NOT_REPRODUCING}

    assert reproducing(load_config("mini-decathlon", words[5:])) == reproducing(saved)


def test_a_finished_run_is_read_back(example: dict[str, Any], tiny_cache: Path) -> None:
    result = example["result"]
    run = example["unirep"].run
    overrides = [*TINY, f"data.cache_dir={tiny_cache}", f"output_dir={result.directory.parent}"]
    again = run("mini-decathlon", [*overrides, "name=api-example", "resume=true"])
    assert again.already_finished and again.metrics == result.metrics


def test_a_dense_student_predicts_maps(tmp_path: Path) -> None:
    """A dense student (untrained here): every task from one forward pass, at the manifest's
    image size, from images of any size."""
    from unirep.models.build import build_network
    from unirep.pipeline.export import export_student
    from unirep.pipeline.student import load_student
    from unirep.tasks import TASK_KINDS, Task

    tasks = {
        "semantic": Task("semantic", TASK_KINDS.build("semantic"), "images", num_classes=5),
        "depth": Task("depth", TASK_KINDS.build("depth"), "images"),
        "normal": Task("normal", TASK_KINDS.build("normal"), "images"),
    }
    arch = {"encoder": "segnet", "encoder_kwargs": {"width_mult": 0.125}, "decoder_channels": 8}
    net = build_network(arch, tasks)
    export_student(
        tmp_path, net, preset="mini-scenes", architecture=arch, tasks=tasks,
        preprocessing={"images": {"image_size": [32, 48]}}, teachers={}, selection={},
    )  # fmt: skip
    student = load_student(tmp_path)
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    out = student.predict(images)
    assert out["semantic"].shape == (2, 32, 48) and out["semantic"].dtype == torch.int64
    assert out["depth"].shape == (2, 1, 32, 48)
    assert out["normal"].shape == (2, 3, 32, 48)
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 32, 48))
    assert student.features(images).shape == (2, 64, 1, 1)  # SegNet's 1/32 bottleneck, C_5 = 64
