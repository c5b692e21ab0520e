"""Variants × seeds on one preset, then one table (mean ± std over seeds) and a plot.

    accelerate launch scripts/compare.py --config mini-scenes-onelabel --seeds 0,1,2 \
        [--variants "supervised distill mtpsl jtr distill+best-of:mtpsl,jtr"] [--name NAME] \
        [--reference supervised] [key=value ...]

Each (variant, seed) runs the whole stage-two recipe (teachers, student, evaluation) into
``<output_dir>/<name>/<variant>-seed<k>/`` (with ``baseline=false``: the reference variant plays
that part); a finished run is read back, so the command resumes an interrupted comparison.
Variants, separated by spaces, are names of the partial-label comparison (``supervised``: the
multi-task model on the same labels, no distillation; ``distill``; ``mtpsl``; ``jtr``;
``distill+best-of:mtpsl,jtr``: distillation plus whichever of the two scored better on
validation) or ``name=key=value;key=value``. The table and plot go to
``<output_dir>/<name>/comparison.{md,json,png}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from teachers.recipe import ensure_teachers
from unirep.cli import parse_args, run
from unirep.compare import (
    PARTIAL_VARIANTS,
    finished_metrics,
    parse_variants,
    resolve,
    write_comparison,
)
from unirep.config import ConfigError
from unirep.recipe import distill, resolve_data
from unirep.rundir import make_accelerator, prepare_run_dir
from unirep.validate import load_config

OPTIONS = ("--seeds", "--variants", "--name", "--reference")


def _options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    options, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key in OPTIONS:
            if "=" in arg:
                options[key] = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                options[key], i = argv[i + 1], i + 1
            else:
                raise ConfigError(f"compare.py: {key} needs a value")
        else:
            rest.append(arg)
        i += 1
    return options, rest


def main() -> None:
    options, argv = _options(sys.argv[1:])
    base = parse_args(argv, prog="compare.py")  # checks the preset and overrides up front
    seeds = [int(s) for s in options.get("--seeds", "0,1,2").split(",") if s]
    variants = parse_variants(options.get("--variants", " ".join(PARTIAL_VARIANTS)).split())
    reference = options.get("--reference", variants[0].name)
    name = options.get("--name", f"compare-{base.preset}")
    overrides = [a for a in argv if "=" in a and not a.startswith("--config")]
    preset = argv[argv.index("--config") + 1] if "--config" in argv else None
    by_name = {v.name: v for v in variants}
    results: dict[str, list[dict]] = {}
    notes: list[str] = []
    folder = None
    for variant in variants:
        extra, note = resolve(variant, by_name, results)
        if note:
            notes.append(note)
        results[variant.name] = []
        for seed in seeds:
            run_name = f"{name}/{variant.name.replace(':', '-').replace(',', '-')}-seed{seed}"
            # the reference variant is the no-distillation model: no run needs its own baseline
            settings = ["baseline=false", *overrides, *extra, f"seed={seed}", f"name={run_name}"]
            cfg = load_config(preset, settings)
            cfg.progress = False
            accelerator = make_accelerator(cfg)
            run_dir = Path(cfg.output_dir) / run_name
            folder = run_dir.parent
            metrics = finished_metrics(run_dir)
            if metrics is None:
                if (run_dir / "config.yaml").exists():
                    cfg.resume = True
                data = resolve_data(cfg, accelerator)
                run_dir = prepare_run_dir(cfg, accelerator)
                seconds = ensure_teachers(cfg, accelerator, data, run_dir)
                metrics = distill(cfg, accelerator, data, run_dir, seconds)
            accelerator.print(
                f"[{variant.name} seed {seed}] Δm vs teachers "
                f"{metrics['summary'].get('delta_m_vs_teachers')}"
            )
            results[variant.name].append(metrics)
    assert folder is not None
    if accelerator.is_main_process:
        write_comparison(folder, base.preset, seeds, results, reference, notes)
        print((folder / "comparison.md").read_text())


if __name__ == "__main__":
    run(main, "compare.py")
