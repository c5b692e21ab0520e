"""The markdown report: tables with the right numbers, valid figures, missing entries."""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from unirep.pipeline.report import (
    CURVES_FIGURE,
    PER_TASK_FIGURE,
    WEIGHTING_FIGURE,
    format_metric,
    prediction_grid_figure,
    write_report,
)
from unirep.training.tracking import CSVLog, read_curves, report_curves, weighting_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics() -> dict[str, Any]:
    return {
        "preset": "mini-decathlon",
        "split": "test",
        "tasks": {
            "svhn": {
                "student": {"accuracy": 0.91234},
                "teacher": {"accuracy": 0.9},
                "baseline": {"accuracy": 0.85},
            },
            "dtd": {"student": {"accuracy": 0.5}, "teacher": {"accuracy": 0.55}},
            "reg": {"student": {"abs_err": 0.51234567}, "teacher": {"abs_err": 0.6}},
        },
        "summary": {
            "delta_m_vs_teachers": 1.2345,
            "decathlon_score": 2612.4,
            "params": {"student": 6_000_000, "teachers_total": 60_000_000},
            "train_seconds": 75.0,
            "num_processes": 2,
        },
    }


def _curves() -> dict[str, dict[str, list[tuple[int, float]]]]:
    return {
        "teacher/svhn": {"train/loss": [(0, 2.3), (10, 1.1), (20, 0.4)]},
        "baseline": {"train/loss": [(0, 2.3), (10, 1.5)], "val/accuracy": [(10, 0.6)]},
        "student": {"train/loss": [(0, 3.0), (10, 1.0)], "val/accuracy": [(10, 0.7), (20, 0.8)]},
    }


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_report_tables_and_figures(tmp_path: Path) -> None:
    report = write_report(tmp_path / "run", _metrics(), _curves())
    assert report == tmp_path / "run" / "report.md"
    text = report.read_text(encoding="utf-8")

    assert text.startswith("# unirep report: mini-decathlon (test split)")
    # teacher | baseline | student, accuracy in % with 2 decimals, errors with 4 decimals
    assert "| svhn | accuracy (%) ↑ | 90.00 | 85.00 | 91.23 |" in text
    assert "| reg | abs_err ↓ | 0.6000 | – | 0.5123 |" in text
    # summary
    assert "| Δm vs teachers (%) | +1.23 |" in text
    assert "| decathlon score | 2612.4 |" in text
    assert "| parameters (student) | 6,000,000 (6.00 M) |" in text
    assert "| parameters (teachers_total) | 60,000,000 (60.00 M) |" in text
    assert "| training time | 75.0 s (1.2 min) |" in text
    assert "| processes | 2 |" in text
    # figures embedded and valid
    assert f"![Training curves]({CURVES_FIGURE})" in text
    assert f"]({PER_TASK_FIGURE})" in text
    assert _is_png(tmp_path / "run" / CURVES_FIGURE)
    assert _is_png(tmp_path / "run" / PER_TASK_FIGURE)
    # no weighting series: no weighting section or figure; no temporary files left behind
    assert "Task weighting" not in text
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        ["report.md", CURVES_FIGURE, PER_TASK_FIGURE]
    )


def test_missing_baseline_and_teacher(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["tasks"] = {"dtd": {"student": {"accuracy": 0.5}}}
    metrics["summary"] = {"params": {"student": 1234}}
    report = write_report(tmp_path, metrics, _curves())
    text = report.read_text(encoding="utf-8")
    assert "| dtd | accuracy (%) ↑ | – | – | 50.00 |" in text
    assert "decathlon score" not in text
    assert "| parameters (student) | 1,234 |" in text
    assert _is_png(tmp_path / PER_TASK_FIGURE)


def test_no_curves_and_extra_sections(tmp_path: Path) -> None:
    extra = ["## Published reference\n\n| method | S |\n|---|---:|\n| URL | 3626 |\n"]
    report = write_report(tmp_path, _metrics(), {}, extra_sections=extra)
    text = report.read_text(encoding="utf-8")
    assert "No training curves were recorded." in text
    assert not (tmp_path / CURVES_FIGURE).exists()
    assert text.rstrip().endswith("| URL | 3626 |")
    # empty extra sections (nothing to say) leave no blank block
    text = write_report(tmp_path, _metrics(), {}, extra_sections=["", *extra]).read_text("utf-8")
    assert "\n\n\n" not in text


def test_rewrite_replaces_previous_report(tmp_path: Path) -> None:
    write_report(tmp_path, _metrics(), _curves())
    metrics = _metrics()
    metrics["preset"] = "second"
    text = write_report(tmp_path, metrics, _curves()).read_text(encoding="utf-8")
    assert text.startswith("# unirep report: second (test split)")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("accuracy", 0.123456, "12.35"),
        ("miou", 0.5, "50.00"),
        ("within_11.25", 0.25, "25.00"),
        ("rel_err", 0.123456, "0.1235"),
        ("angle_median", 21.5, "21.5000"),
        ("accuracy", None, "–"),
    ],
)
def test_format_metric(name: str, value: float | None, expected: str) -> None:
    assert format_metric(name, value) == expected


def test_sparse_metrics_do_not_break_the_report(tmp_path: Path) -> None:
    metrics = {
        "preset": "p",
        "split": "val",
        "tasks": {"a": {}},
        "summary": {"delta_m_vs_teachers": None, "decathlon_score": None, "note": "smoke"},
    }
    text = write_report(tmp_path, metrics, {"student": {"train/loss": []}}).read_text("utf-8")
    assert "Δm" not in text
    assert "| note | smoke |" in text
    assert not (tmp_path / PER_TASK_FIGURE).exists()
    assert not (tmp_path / CURVES_FIGURE).exists()


def test_aggregate_runs_mean_and_std() -> None:
    from unirep.pipeline.report import aggregate_runs

    def run(student: float, baseline: float) -> dict:
        return {
            "tasks": {
                "a": {
                    "teacher": {"accuracy": 0.5},
                    "baseline": {"accuracy": baseline},
                    "student": {"accuracy": student},
                }
            },
            "summary": {
                "mean_accuracy": student,
                "baseline_mean_accuracy": baseline,
                "teacher_mean_accuracy": 0.5,
                "delta_m_vs_teachers": 10.0,
                "baseline_delta_m_vs_teachers": 0.0,
            },
        }

    table = aggregate_runs([run(0.6, 0.5), run(0.8, 0.7)])
    assert "2 runs" in table
    assert "| a | accuracy (%) ↑ | 50.00 ± 0.00 | 60.00 ± 14.14 | 70.00 ± 14.14 |" in table
    assert "| **summary** | Δm vs teachers (%) | – | 0.00 ± 0.00 | 10.00 ± 0.00 |" in table


# --------------------------------------------------------------------------------------------
# Task weighting
# --------------------------------------------------------------------------------------------


def _raw_curves() -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Raw logged series of a two-task student (with pcgrad-style cosines) and a teacher."""
    return {
        "student": {
            "train/loss": [(0, 3.0), (10, 1.0)],
            "train/lr": [(0, 0.1), (10, 0.05)],
            "train/task/a": [(0, 2.0), (10, 1.0)],
            "train/task/b": [(0, 4.0), (10, 3.0)],
            "train/weight/a": [(10, 0.5), (0, 1.0)],  # out of order on purpose
            "train/weight/b": [(0, 1.0), (10, 2.0)],
            "train/gradcos/a~b": [(0, 0.25), (10, -0.5)],
            "train/dominance/enc.conv1/a": [(10, 0.9)],
            "train/dominance/enc.conv1/b": [(10, 0.1)],
            "val/score": [(10, 0.7)],
        },
        "teacher-a": {"train/task/a": [(0, 2.0)], "train/weight/a": [(0, 1.0)]},
        "baseline": {"train/task/a": [(0, 2.0)], "train/task/b": [(0, 1.0)]},
    }


def test_report_curves_average_tasks_but_not_weighting_terms() -> None:
    out = report_curves(_raw_curves())
    assert out["student"] == {
        "train/lr": [(0, 0.1), (10, 0.05)],
        "train/task (task mean)": [(0, 3.0), (10, 2.0)],
        "val/score": [(10, 0.7)],
    }
    assert out["teacher-a"] == {"train/task (task mean)": [(0, 2.0)]}
    assert not any(
        "weight" in k or "gradcos" in k or "dominance" in k
        for series in out.values()
        for k in series
    )


def test_weighting_curves_are_split_out_per_task_and_pair() -> None:
    out = weighting_curves(_raw_curves())
    assert set(out) == {"student", "teacher-a"}  # the baseline logged none
    assert out["student"] == {
        "weight": {"a": [(0, 1.0), (10, 0.5)], "b": [(0, 1.0), (10, 2.0)]},
        "gradcos": {"a~b": [(0, 0.25), (10, -0.5)]},
        "dominance": {"enc.conv1/a": [(10, 0.9)], "enc.conv1/b": [(10, 0.1)]},
    }
    assert out["teacher-a"] == {"weight": {"a": [(0, 1.0)]}, "gradcos": {}, "dominance": {}}
    assert weighting_curves({"p": {"train/weight/a": []}, "q": {"train/task/a": [(0, 1.0)]}}) == {}


def test_weighting_curves_from_the_csv_log(tmp_path: Path) -> None:
    log = CSVLog(tmp_path, "student", enabled=True)
    log.log(0, {"train/loss": 1.0, "train/weight/a": 0.5, "train/gradcos/a~b": -0.25})
    log.log(1, {"train/loss": 0.5, "train/weight/a": 0.75, "train/gradcos/a~b": 0.125})
    out = weighting_curves(read_curves(tmp_path))
    assert out == {
        "student": {
            "weight": {"a": [(0, 0.5), (1, 0.75)]},
            "gradcos": {"a~b": [(0, -0.25), (1, 0.125)]},
            "dominance": {},
        }
    }


def test_weighting_figure_written_and_referenced(tmp_path: Path) -> None:
    raw = _raw_curves()
    report = write_report(tmp_path, _metrics(), report_curves(raw), weighting=weighting_curves(raw))
    text = report.read_text(encoding="utf-8")
    assert "## Task weighting" in text and "rAU" in text
    assert f"![Task weighting]({WEIGHTING_FIGURE})" in text
    assert _is_png(tmp_path / WEIGHTING_FIGURE)
    # before any extra section, after the training curves
    assert text.index("## Training curves") < text.index("## Task weighting")


def test_weighting_figure_with_only_weights(tmp_path: Path) -> None:
    weighting = {"teacher-a": {"weight": {"a": [(0, 1.0)]}, "gradcos": {}}}
    text = write_report(tmp_path, _metrics(), {}, weighting=weighting).read_text("utf-8")
    assert f"]({WEIGHTING_FIGURE})" in text
    assert _is_png(tmp_path / WEIGHTING_FIGURE)


@pytest.mark.parametrize(
    "weighting",
    [None, {}, {"student": {"weight": {"a": []}, "gradcos": {}}}],
)
def test_no_weighting_series_no_figure(tmp_path: Path, weighting: Any) -> None:
    text = write_report(tmp_path, _metrics(), _curves(), weighting=weighting).read_text("utf-8")
    assert "Task weighting" not in text
    assert not (tmp_path / WEIGHTING_FIGURE).exists()


# --------------------------------------------------------------------------------------------
# Prediction grid
# --------------------------------------------------------------------------------------------


def test_prediction_grid_with_render_functions() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    ids = rng.integers(0, 3, size=(3, 8, 8))
    scalar = rng.uniform(0.0, 5.0, size=(3, 1, 8, 8))
    seen_targets: list[Any] = []

    def render_scalar(pred: Any, target: Any) -> Any:
        seen_targets.append(target)
        top = float(pred.max()) if target is None else float(np.asarray(target).max())
        return np.repeat(pred[0][..., None] / max(top, 1e-6), 3, axis=-1)

    render = {
        "ids": lambda pred, target: np.eye(3)[np.asarray(pred)],
        "scalar": render_scalar,
    }
    columns = {
        "ground truth": {"ids": ids, "scalar": torch.from_numpy(scalar)},  # tensors work too
        "student": {"ids": ids, "scalar": scalar * 2},
        "baseline": {"ids": ids},  # no scalar prediction: a blank cell
    }
    png = prediction_grid_figure(images, columns, ["ids", "scalar"], render)
    picture = Image.open(io.BytesIO(png))
    assert png[:8] == PNG_MAGIC
    assert picture.format == "PNG" and picture.height > picture.width  # 6 rows, 4 columns
    # the ground truth is handed to every source's render as the target
    assert len(seen_targets) == 6 and all(t is not None for t in seen_targets)

    with pytest.raises(ValueError, match="render"):
        prediction_grid_figure(images, columns, ["ids", "scalar"], {"ids": render["ids"]})


# --------------------------------------------------------------------------------------------
# No task names in the report code
# --------------------------------------------------------------------------------------------

# Task names of the built-in benchmarks: the report must learn them from the run, not the code.
_TASK_NAMES = frozenset(
    {
        "semantic",
        "depth",
        "normal",
        "normals",
        "aircraft",
        "cifar100",
        "daimlerpedcls",
        "dtd",
        "gtsrb",
        "imagenet12",
        "omniglot",
        "svhn",
        "ucf101",
        "flowers",
    }
)


def _code_words(source: str) -> set[str]:
    """Lower-case words of the identifiers and string literals of ``source``, docstrings (and
    any other bare string statement) and comments excluded."""
    bare_strings = {
        (node.value.lineno, node.value.col_offset)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    kinds = {tokenize.NAME, tokenize.STRING}
    if hasattr(tokenize, "FSTRING_MIDDLE"):  # Python >= 3.12 splits f-strings
        kinds.add(tokenize.FSTRING_MIDDLE)
    words: set[str] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in kinds or token.start in bare_strings:
            continue
        words.update(re.split(r"[^a-z0-9]+", token.string.lower()))
    return words


def test_code_words_sees_identifiers_and_literals_not_docstrings() -> None:
    source = '''"""Module docstring about depth."""
def f(semantic_rgb):  # a comment about normal
    """Docstring: svhn."""
    return {"depth": semantic_rgb, "key": f"{semantic_rgb}_normal"}
'''
    words = _code_words(source)
    assert {"semantic", "depth", "normal"} <= words
    assert "svhn" not in words


@pytest.mark.parametrize(
    "module",
    [
        "unirep.pipeline.report", "unirep.pipeline.report_sections", "unirep.pipeline.results",
        "unirep.pipeline.stage_two", "unirep.training.tracking", "unirep.training.trainer",
        "unirep.training.evaluator", "unirep.training.trainable", "unirep.experiments.benchmark",
        "unirep.objective", "unirep.batch", "unirep.stage_one.train",
    ],
)  # fmt: skip
def test_no_task_names_in_report_code(module: str) -> None:
    """The kind-agnostic layers learn the tasks from the run (issue 8: tasks are data)."""
    module = importlib.import_module(module)
    source = Path(module.__file__).read_text(encoding="utf-8")
    found = sorted(_code_words(source) & _TASK_NAMES)
    assert not found, f"{module.__name__} names tasks in code: {found}"
