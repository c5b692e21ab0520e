"""Stage one alone: train (or verify) one teacher per domain, or per task for dense presets.

accelerate launch scripts/train_teachers.py [--config PRESET_OR_PATH] [key=value ...]
"""

from __future__ import annotations

from unirep.cli import parse_args, run
from unirep.pipeline import make_accelerator, prepare_run_dir, teacher_root


def main() -> None:
    cfg = parse_args(prog="train_teachers.py")
    accelerator = make_accelerator(cfg)
    if cfg.dense is not None:
        from teachers.dense import ensure_dense_teachers
        from unirep.dense_pipeline import resolve_dense_data

        data = resolve_dense_data(cfg, accelerator)  # bad data fails before anything is written
        run_dir = prepare_run_dir(cfg, accelerator)
        seconds = ensure_dense_teachers(cfg, accelerator, data, run_dir)
    else:
        from teachers.classification import ensure_teachers
        from unirep.pipeline import resolve_domains

        domains = resolve_domains(cfg, accelerator)
        run_dir = prepare_run_dir(cfg, accelerator)
        seconds = ensure_teachers(cfg, accelerator, domains, run_dir)
    accelerator.print(
        f"teachers in {teacher_root(cfg) / cfg.preset} ({seconds:.1f} s of training this run)"
    )
    accelerator.end_training()


if __name__ == "__main__":
    run(main, "train_teachers.py")
