"""Stage one and two in one command: train missing teachers, then distil the student.

    accelerate launch scripts/distill.py [--config PRESET_OR_PATH] [key=value ...]
    unirep distill [--config PRESET_OR_PATH] [key=value ...]       (the installed equivalent)

With no arguments it runs the embedded ``mini-decathlon`` preset (generated offline on first use);
``--config mini-scenes`` runs the embedded dense multi-task benchmark. From Python:
:func:`unirep.pipeline.api.run`, which this command calls.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from accelerate import PartialState

import unirep.layout as layout
from unirep.cli import args as command_line
from unirep.pipeline.api import run_config

PROG = "unirep distill"


def summary_line(s: dict[str, Any]) -> str:
    """One line: the student against the baseline and the teachers (accuracies in %), and how
    clear each difference is where the run measured it (``summary.uncertainty``)."""
    from unirep.pipeline.report import comparison_sentence

    def fmt(key: str, spec: str, scale: float = 1.0) -> str:
        return "–" if s.get(key) is None else format(scale * s[key], spec)

    line = f"student Δm vs teachers {fmt('delta_m_vs_teachers', '+.2f')} %"
    if "baseline_delta_m_vs_teachers" in s:
        line += f" | baseline {fmt('baseline_delta_m_vs_teachers', '+.2f')} %"
    if "mean_accuracy" in s:
        line += f" | student mean accuracy {fmt('mean_accuracy', '.2f', 100.0)} %"
        if "baseline_mean_accuracy" in s:
            line += f" | baseline {fmt('baseline_mean_accuracy', '.2f', 100.0)} %"
        line += f" | teachers {fmt('teacher_mean_accuracy', '.2f', 100.0)} %"
    for name, record in (s.get("uncertainty") or {}).items():
        line += f" | {comparison_sentence(name, record)}"
    return line


def main(prog: str = PROG) -> None:
    result = run_config(command_line.parse_args(prog=prog))
    state = PartialState()
    if not result.already_finished:
        state.print(summary_line(result.metrics["summary"]))
        state.print(f"report: {result.directory / layout.REPORT}")
    state.destroy_process_group()  # the launch ends here (run leaves it for a next call)


def cli(prog: str = PROG) -> None:
    """The console entry point (``unirep distill``; ``scripts/distill.py`` passes its name)."""
    command_line.run(partial(main, prog), prog)
