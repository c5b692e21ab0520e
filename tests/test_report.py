"""The markdown report: tables with the right numbers, valid figures, missing entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from unirep.report import CURVES_FIGURE, PER_TASK_FIGURE, format_metric, write_report

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
            "depth": {"student": {"abs_err": 0.51234567}, "teacher": {"abs_err": 0.6}},
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
    assert "| depth | abs_err ↓ | 0.6000 | – | 0.5123 |" in text
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
    # no temporary files left behind
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
    from unirep.report import aggregate_runs

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
