"""Variants × seeds on one preset, and one table: ``scripts/compare.py``.

A *variant* is a name and a list of config overrides. Each (variant, seed) is a whole run of the
stage-two recipe in its own folder ``<output_dir>/<name>/<variant>-seed<k>/`` (a finished one is
read back, never re-run, so an interrupted comparison continues where it stopped). The table has,
per variant, the mean ± std over seeds of every test metric of the student, of Δm against the
run's teachers and of Δm against the ``reference`` variant of the same seed (for partial labels:
the supervised multi-task model trained on the same labels, JTR's protocol). A variant named
``best-of:a,b`` resolves, once ``a`` and ``b`` have run, to whichever has the better mean
**validation** score (its selection record), never the test split.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unirep.config import ConfigError
from unirep.io import atomic_write_json, atomic_write_text, read_json
from unirep.metrics import delta_m
from unirep.report import format_metric, write_figure
from unirep.tasks import TASK_KINDS

COMPARISON = "comparison"

PARTIAL_VARIANTS: dict[str, list[str]] = {
    "supervised": ["distill.enabled=false", "partial.method=none"],
    "distill": ["partial.method=none"],
    "mtpsl": ["distill.enabled=false", "partial.method=mtpsl"],
    "jtr": ["distill.enabled=false", "partial.method=jtr"],
    "distill+best-of:mtpsl,jtr": [],
}
"""The comparison of issue 10 on a partially labelled preset; ``supervised`` is the reference."""


@dataclass
class Variant:
    name: str
    overrides: list[str]


def parse_variants(specs: list[str]) -> list[Variant]:
    """``name=override;override`` strings (or the names of :data:`PARTIAL_VARIANTS`)."""
    variants = []
    for spec in specs:
        if "=" in spec.split(";")[0] and not spec.startswith(("distill+", "best-of:")):
            name, rest = spec.split("=", 1)
            variants.append(Variant(name, [o for o in rest.split(";") if o]))
        elif spec in PARTIAL_VARIANTS:
            variants.append(Variant(spec, list(PARTIAL_VARIANTS[spec])))
        else:
            raise ConfigError(
                f"variant {spec!r}: write name=key=value;key=value, or one of "
                f"{', '.join(PARTIAL_VARIANTS)}"
            )
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be unique, got {names}")
    return variants


def _best_of(name: str) -> tuple[str, list[str]] | None:
    """``(prefix, [a, b])`` of a ``[distill+]best-of:a,b`` variant name."""
    if "best-of:" not in name:
        return None
    prefix, _, rest = name.partition("best-of:")
    return prefix, [c for c in rest.split(",") if c]


def validation_score(metrics: dict[str, Any]) -> float:
    """The student's best validation score (its selection record)."""
    record = metrics["summary"]["selection"]["student"]
    return float(next(v for k, v in record.items() if k.startswith("val_")))


def resolve(
    variant: Variant, variants: dict[str, Variant], results: dict[str, list[dict[str, Any]]]
) -> tuple[list[str], str]:
    """The overrides of ``variant`` (a ``best-of`` one: of its better candidate on validation),
    and a note saying what was chosen."""
    best = _best_of(variant.name)
    if best is None:
        return variant.overrides, ""
    prefix, candidates = best
    missing = [c for c in candidates if c not in results]
    if missing:
        raise ConfigError(f"variant {variant.name!r}: run {', '.join(missing)} before it")
    scores = {c: statistics.fmean(validation_score(m) for m in results[c]) for c in candidates}
    chosen = max(scores, key=lambda c: scores[c])
    overrides = [o for o in variants[chosen].overrides if not o.startswith("distill.enabled")]
    if prefix.startswith("distill"):
        overrides.append("distill.enabled=true")
    overrides += variant.overrides
    note = ", ".join(f"{c} {s:+.3f}" for c, s in scores.items())
    return overrides, f"{variant.name} → {chosen} (mean validation score: {note})"


def _main_deltas(run: dict[str, Any], ref: dict[str, Any]) -> float | None:
    """Δm (%) of ``run``'s student over ``ref``'s student, on each task's main metric."""
    mine, theirs = {}, {}
    for task, entry in run["tasks"].items():
        metric = _main_metric(entry["student"])
        if metric is None or task not in ref["tasks"]:
            continue
        a, b = entry["student"].get(metric), ref["tasks"][task]["student"].get(metric)
        if a is None or not b:
            continue
        mine[task], theirs[task] = {metric: a}, {metric: b}
    return delta_m(mine, theirs) if mine else None


def _main_metric(results: dict[str, Any]) -> str | None:
    for kind in TASK_KINDS.names():
        metric = TASK_KINDS.build(kind).main_metric
        if metric in results:
            return metric
    return None


def _stat(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(
    results: dict[str, list[dict[str, Any]]], reference: str | None
) -> dict[str, dict[str, Any]]:
    """Per variant: ``{"seeds", "<task>/<metric>": [mean, std], "delta_m_vs_teachers": ...,
    "delta_m_vs_<reference>": ...}`` over its runs (seeds in the same order for every variant)."""
    table: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        for task, entry in runs[0]["tasks"].items():
            for metric in entry["student"]:
                values = [r["tasks"][task]["student"][metric] for r in runs]
                if all(v is not None for v in values):
                    row[f"{task}/{metric}"] = list(_stat(values))
        teachers = [r["summary"].get("delta_m_vs_teachers") for r in runs]
        if all(v is not None for v in teachers):
            row["delta_m_vs_teachers"] = list(_stat(teachers))
        if reference is not None and reference in results:
            deltas = [
                _main_deltas(run, ref) for run, ref in zip(runs, results[reference], strict=True)
            ]
            if deltas and all(d is not None for d in deltas):
                row[f"delta_m_vs_{reference}"] = list(_stat(deltas))  # type: ignore[arg-type]
        table[name] = row
    return table


def markdown(
    table: dict[str, dict[str, Any]], preset: str, seeds: list[int], notes: list[str]
) -> str:
    """The comparison as a markdown table (mean ± std over seeds)."""
    columns = list(dict.fromkeys(k for row in table.values() for k in row if k != "seeds"))
    header = ["variant", *[_label(c) for c in columns]]
    lines = [
        f"## Comparison on `{preset}` (seeds {', '.join(map(str, seeds))}; test split, "
        "mean ± std over seeds)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(columns)) + "|",
    ]
    for name, row in table.items():
        cells = []
        for c in columns:
            if c not in row:
                cells.append("–")
                continue
            mean, std = row[c]
            metric = c.split("/")[-1]
            if c.startswith("delta_m"):
                cells.append(f"{mean:+.2f} ± {std:.2f}")
            else:
                cells.append(f"{format_metric(metric, mean)} ± {format_metric(metric, std)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _label(column: str) -> str:
    if column == "delta_m_vs_teachers":
        return "Δm vs teachers (%)"
    if column.startswith("delta_m_vs_"):
        return f"Δm vs {column.removeprefix('delta_m_vs_')} (%)"
    return column


def figure(table: dict[str, dict[str, Any]], reference: str | None) -> bytes | None:
    """Bars of each variant's Δm (vs the reference variant, else vs the teachers) ± std."""
    key = f"delta_m_vs_{reference}" if reference else "delta_m_vs_teachers"
    rows = {n: r[key] for n, r in table.items() if key in r}
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.2))
    names = list(rows)
    means = [rows[n][0] for n in names]
    stds = [rows[n][1] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(_label(key))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_comparison(
    folder: Path,
    preset: str,
    seeds: list[int],
    results: dict[str, list[dict[str, Any]]],
    reference: str | None,
    notes: list[str],
) -> dict[str, Any]:
    """``comparison.{md,json,png}`` in ``folder``; returns the JSON's content."""
    table = summarise(results, reference)
    content = {
        "preset": preset,
        "seeds": seeds,
        "reference": reference,
        "variants": table,
        "notes": notes,
    }
    atomic_write_json(folder / f"{COMPARISON}.json", content)
    text = markdown(table, preset, seeds, notes)
    png = figure(table, reference)
    if png is not None:
        write_figure(folder / f"{COMPARISON}.png", png)
        text += f"\n![comparison]({COMPARISON}.png)\n"
    atomic_write_text(folder / f"{COMPARISON}.md", text)
    return content


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    return read_json(path, what="run metrics") if path.is_file() else None
