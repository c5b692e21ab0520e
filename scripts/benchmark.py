"""Print the student's training-step speed and peak memory, (a) task loss alone vs (b) distillation.

    python scripts/benchmark.py [--config PRESET_OR_PATH] [key=value ...]

Uses the preset's model, domains (their class counts) and per-domain batch sizes; for a dense
preset, its encoder, tasks, cross-task module and batch at the benchmark's image size.
"""

from __future__ import annotations

from unirep.benchmark import run_benchmark
from unirep.cli import parse_args
from unirep.config import Config, cache_dir
from unirep.data.decathlon import DECATHLON_NUM_CLASSES
from unirep.data.sources import build_domains

#: Image size of the MTAN releases, by label folder (no data needed to time a step).
MTAN_SIZES = {"label": (288, 384), "label_7": (128, 256), "label_19": (128, 256)}


def dense_main(cfg: Config) -> None:
    assert cfg.dense is not None
    if cfg.data.source == "mini-scenes":
        g = {"height": 48, "width": 64, **cfg.data.generator}
        size = (int(g["height"]), int(g["width"]))
    else:
        size = MTAN_SIZES.get(cfg.dense.label_dir, (288, 384))
    cross = cfg.dense.cross_task
    print(
        f"preset {cfg.preset}: encoder {cfg.dense.encoder.name} {cfg.dense.encoder.kwargs}, "
        f"tasks {list(cfg.dense.tasks)}, cross-task {cross.name if cross else None}, "
        f"batch {cfg.data.batch_size} at {size[0]}x{size[1]}"
    )
    report(run_benchmark(cfg, {}, dense_size=size))


def report(results: dict) -> None:
    for name in ("task_only", "distillation"):
        r = results[name]
        label = "(a)" if name == "task_only" else "(b)"
        print(
            f"{label} {name:13s} {r['steps_per_second']:7.2f} steps/s "
            f"{r['images_per_second']:8.0f} img/s  "
            f"peak {r['memory']} {r['peak_memory_mib']:8.1f} MiB "
            f"[{r['device']}, {r['threads']} threads]"
        )
    ratio = results["ratio"]
    print(
        f"ratio (b)/(a): time per step x{ratio['time_per_step']:.2f}, "
        f"peak memory x{ratio['peak_memory']:.2f}"
    )


def main() -> None:
    cfg = parse_args(prog="benchmark.py")
    if cfg.dense is not None:
        dense_main(cfg)
        return
    if cfg.data.source == "decathlon" and not cfg.data.root:
        # no data needed to time a step: the official domains' class counts
        names = cfg.data.domains or list(DECATHLON_NUM_CLASSES)
        classes = {d: DECATHLON_NUM_CLASSES[d] for d in names}
    else:
        domains = build_domains(cfg.data, cache_dir(cfg))
        classes = {d: domains.dataset(d, "val").num_classes for d in domains.domains}
    batch = {d: cfg.data.batch_sizes.get(d, cfg.data.batch_size) for d in classes}
    crops = {d: cfg.data.crops.get(d, cfg.data.crop) for d in classes}
    print(
        f"preset {cfg.preset}: backbone {cfg.model.backbone}"
        f"{' + residual adapters' if cfg.model.residual_adapters else ''}, {len(classes)} domains, "
        f"batch per domain {batch}, crops {crops}"
    )
    report(run_benchmark(cfg, classes))


if __name__ == "__main__":
    main()
