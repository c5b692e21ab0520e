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
    assert "| student Δm vs teachers (%) | +1.23 |" in text
    run_relative = "Decathlon score, run-relative (each domain's teacher as the reference)"
    assert f"| student {run_relative} | 2612.4 |" in text
    assert "| parameters (student) | 6,000,000 (6.00 M) |" in text
    assert "| parameters (all teachers) | 60,000,000 (60.00 M) |" in text
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
    assert "How clear" not in text  # nothing compared, nothing to qualify
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
    assert "2 runs" in table and "sample standard deviation" in table
    assert "| a | accuracy (%) ↑ | 50.00 ± 0.00 | 60.00 ± 14.14 | 70.00 ± 14.14 |" in table
    assert "| **summary** | Δm vs teachers (%) | – | 0.00 ± 0.00 | 10.00 ± 0.00 |" in table
    # the student's differences over the runs: +10 points both times (no spread), +20 and 0
    assert "- student − baseline: +10.00 ± 0.00 percentage points of mean accuracy over 2 runs" in (
        table
    )
    assert "student ahead in 2 of 2): clearly better." in table
    spread = aggregate_runs([run(0.7, 0.5), run(0.5, 0.5)])
    half = 12.706 * 14.142135623730951 / 2**0.5  # t(0.975, 1) · std / √n
    assert (
        f"- student − teachers: +10.00 ± 14.14 percentage points of mean accuracy over 2 runs "
        f"(95 % CI {10 - half:+.2f} … {10 + half:+.2f} of the mean; student ahead in 1 of 2): "
        "no clear difference."
    ) in spread


def test_aggregate_runs_with_their_own_bootstrap_and_one_run() -> None:
    from unirep.pipeline.report import aggregate_runs

    def run(difference: float, verdict: str) -> dict:
        record = {"difference": difference, "ci95": [difference - 1, difference + 1],
                  "unit": "%", "verdict": verdict, "quantity": "Δm"}  # fmt: skip
        return {
            "tasks": {"a": {"student": {"miou": 0.5}}},
            "summary": {"delta_m_vs_baseline": difference,
                        "uncertainty": {"student_vs_baseline": record}},
        }  # fmt: skip

    table = aggregate_runs([run(2.0, "clearly better"), run(0.5, "no clear difference")])
    assert "- student vs baseline: Δm +1.25 ± 1.06 % over 2 runs" in table
    assert "Each run's own bootstrap: a clear difference in 1 of 2." in table
    assert "| **summary** | Δm vs baseline (%) | – | – | 1.25 ± 1.06 |" in table
    one = aggregate_runs([run(2.0, "clearly better")])
    assert "- student vs baseline: Δm +2.00 % in the one run: no spread." in one


# --------------------------------------------------------------------------------------------
# Units, uncertainty and labels in the summary
# --------------------------------------------------------------------------------------------


def _uncertain(difference: float, ci: list[float], verdict: str) -> dict[str, Any]:
    return {
        "quantity": "mean accuracy",
        "difference": difference,
        "ci95": ci,
        "unit": "percentage points",
        "verdict": verdict,
        "resamples": 1000,
        "seed": 0,
        "images": 2500,
        "per_task": {
            "svhn": {"metric": "accuracy", "difference": difference, "ci95": ci,
                     "unit": "percentage points", "verdict": verdict, "images": 2500,
                     "mcnemar_p": 0.8312, "discordant": [40, 38]},
        },
    }  # fmt: skip


def test_a_tie_reads_as_no_clear_difference(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["summary"].update(
        mean_accuracy=0.8563,
        baseline_mean_accuracy=0.8556,
        teacher_mean_accuracy=0.8555,
        uncertainty={
            "student_vs_baseline": _uncertain(0.07, [-0.9, 1.0], "no clear difference"),
            "student_vs_teachers": _uncertain(1.5, [0.4, 2.6], "clearly better"),
        },
    )
    text = write_report(tmp_path, metrics, {}).read_text("utf-8")
    assert "## How clear the differences are" in text
    assert (
        "- student − baseline: +0.07 percentage points of mean accuracy (95 % CI -0.90 … +1.00): "
        "no clear difference." in text
    )
    assert (
        "- student − teachers: +1.50 percentage points of mean accuracy (95 % CI +0.40 … "
        "+2.60): clearly better." in text
    )
    assert "| svhn | student − baseline | accuracy (points) | +0.07 | -0.90 … +1.00 | 0.831 | " in (
        text
    )
    assert "paired bootstrap over the 2,500 test images (1000 resamples, seed 0)" in text
    # one unit per quantity: percentages ×100 under a % label, never a raw fraction or key
    assert "| student mean accuracy (%) | 85.63 |" in text
    assert "| baseline mean accuracy (%) | 85.56 |" in text
    assert "| teachers' mean accuracy (%) | 85.55 |" in text
    assert "0.8563" not in text and "mean_accuracy" not in text
    # the uncertainty sits right under the summary, before the per-task table
    assert text.index("## Summary") < text.index("## How clear") < text.index("## Per-task")


def test_the_report_opens_with_whether_distillation_helped(tmp_path: Path) -> None:
    from unirep.pipeline.report import verdict_over_runs, verdict_sentence

    summary = {
        "uncertainty": {
            "student_vs_baseline": _uncertain(1.8, [0.9, 2.7], "clearly better"),
            "student_vs_teachers": _uncertain(0.3, [-0.6, 1.2], "no clear difference"),
        }
    }
    sentence = verdict_sentence(summary)
    assert sentence.startswith(
        "**Did distillation help?** Partly. The student is, against the baseline (the same "
        "network and budget without distillation), +1.80 points of mean accuracy (clearly better "
        "at 95 %); "
    )
    assert sentence.endswith("against the teachers, +0.30 points of mean accuracy (no clear "
                             "difference at 95 %).")  # fmt: skip
    summary["uncertainty"]["student_vs_teachers"] = _uncertain(1.1, [0.2, 2.0], "clearly better")
    assert verdict_sentence(summary).startswith("**Did distillation help?** Yes.")
    # without a bootstrap: from the means (points) or the Δm (%); a loss reads "No"
    dense = {"delta_m_vs_teachers": -1.5, "delta_m_vs_baseline": -0.5}
    assert verdict_sentence(dense) == (
        "**Did distillation help?** No. The student is, against the baseline (the same network "
        "and budget without distillation), -0.50 % of Δm; against the teachers, -1.50 % of Δm."
    )
    assert verdict_sentence({}) == ""
    # over seeds: the spread, and how many runs the student is ahead in
    runs = [{"summary": {"delta_m_vs_teachers": d, "delta_m_vs_baseline": d + 3}}
            for d in (4.0, 2.0, -1.0)]  # fmt: skip
    over = verdict_over_runs(runs)
    assert over.startswith("**Did distillation help?** Partly. Over 3 runs (mean ± std)")
    assert "against the baseline (the same network and budget without distillation), +4.67 ± " \
        "2.52 % of Δm (ahead in 3 of 3 runs)" in over  # fmt: skip
    assert "against the teachers, +1.67 ± 2.52 % of Δm (ahead in 2 of 3 runs)." in over
    # first thing under the title, in the report and in the aggregate
    metrics = _metrics()
    metrics["summary"].update(summary)
    text = write_report(tmp_path, metrics, {}).read_text("utf-8")
    assert text.splitlines()[2].startswith("**Did distillation help?** Yes.")


def test_the_summary_names_every_quantity_in_words() -> None:
    from unirep.pipeline.report import _summary_table

    summary = {
        "mean_accuracy": 0.5, "teacher_mean_accuracy": 0.25, "delta_m_vs_baseline": -1.5,
        "delta_m_all_metrics_vs_teachers": 2.0, "decathlon_score": 300.0,
        "official_decathlon_score": {"student": 2500.0, "teacher": 2400.0},
        "params": {"student": 10, "adapters": 2, "teachers_total": 30},
        "backbone_multiplier": 2.125, "weighting": "sum", "cross_task": None,
        "num_processes": 1, "train_seconds": 3.0, "delta_m_metrics": ["a/accuracy"],
        "selection": {"student": {}}, "some_new_number": 0.123456,
    }  # fmt: skip
    table = _summary_table(summary)
    official = "Decathlon score, official (published ResNet-26 Finetune errors as the reference)"
    for row in (
        "| student mean accuracy (%) | 50.00 |",
        "| teachers' mean accuracy (%) | 25.00 |",
        "| student Δm vs baseline (%) | -1.50 |",
        "| student Δm vs teachers, all metrics (%) | +2.00 |",
        "| student Decathlon score, run-relative (each domain's teacher as the reference) "
        "| 300.0 |",
        f"| student {official} | 2500.0 |",
        f"| teachers {official} | 2400.0 |",
        "| parameters (alignment adapters) | 2 |",
        "| student backbone size (teacher backbones) | 2.12 × |",
        "| task weighting | sum |",
        "| some new number | 0.1235 |",
    ):
        assert row in table, row
    cells = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
    assert not [c for c in cells if "_" in c], cells  # no raw key names


def test_a_partial_label_run_says_which_labels_it_had(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["summary"]["partial"] = {
        "protocol": "one-label",
        "method": "mtpsl",
        "distillation": True,
        "labels": {
            "num_images": 795,
            "labels_per_task": {"x": 265, "y": 265, "z": 265},
            "fraction_per_task": {"x": 0.3333, "y": 0.3333, "z": 0.3333},
            "labels_per_image": {"0": 0, "1": 795, "2": 0, "3": 0},
            "unlabelled_images": 0,
        },
    }
    text = write_report(tmp_path, metrics, {}).read_text("utf-8")
    assert "## Training labels" in text
    assert "Protocol `one-label`, method `mtpsl`, distillation on." in text
    assert (
        "Of the 795 training images, each task was labelled on those below (0 images have no "
        "label at all); the split is saved in `label_split.json`." in text
    )
    assert "| x | 265 | 33.3 |" in text
    metrics["summary"]["partial"] = {"protocol": "full", "method": "jtr", "labels": {}}
    text = write_report(tmp_path, metrics, {}).read_text("utf-8")
    assert "Protocol `full`, method `jtr`. Every training image is labelled for every task." in (
        text
    )


def test_the_summary_line_has_one_unit_and_the_verdicts() -> None:
    from unirep.cli.distill import summary_line

    summary = {
        "delta_m_vs_teachers": 0.09,
        "baseline_delta_m_vs_teachers": 0.01,
        "mean_accuracy": 0.8563,
        "baseline_mean_accuracy": 0.8556,
        "teacher_mean_accuracy": 0.8555,
        "uncertainty": {
            "student_vs_baseline": _uncertain(0.07, [-0.9, 1.0], "no clear difference")
        },
    }
    line = summary_line(summary)
    assert "student mean accuracy 85.63 % | baseline 85.56 % | teachers 85.55 %" in line
    assert line.endswith(
        "student − baseline: +0.07 percentage points of mean accuracy (95 % CI -0.90 … +1.00): "
        "no clear difference"
    )


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
