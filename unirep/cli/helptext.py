"""The help of a subcommand, without importing the training stack: ``--help`` answers at once.

:func:`usage` lists the presets (read from the preset folder) and the most used keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from unirep.config.load import preset_names

COMMON_KEYS = (
    ("seed=N", "the run's seed"),
    ("name=RUN", "the run folder's name under output_dir (default: <preset>-<time>)"),
    ("output_dir=DIR", "where run folders go (default: runs)"),
    ("resume=true", "continue the run called name= from its latest checkpoint"),
    ("train.max_steps=N", "the baseline's and student's steps"),
    ("baseline=false", "skip the same student trained without distillation"),
    ("distill.enabled=false", "train the student without the teachers' losses"),
    ("weighting=NAME", "task balancing: sum, uncertainty, famo, pcgrad, ..."),
    ("data.root=DIR", "a real dataset's folder (decathlon, nyuv2, cityscapes presets)"),
    ("teachers.root=DIR", "where teachers are cached"),
    ("log_with=tensorboard", "also log to TensorBoard (wandb, mlflow, all)"),
)
"""The keys a user sets most, shown by ``--help`` (the rest: docs/configuration.md)."""


def usage(prog: str, options: Sequence[str] = ()) -> str:
    """The help of one subcommand: its shape, the presets and the most used keys."""
    extra = "".join(f" [{o} VALUE]" for o in options)
    width = max(len(k) for k, _ in COMMON_KEYS)
    keys = "\n".join(f"    {k:<{width}}  {text}" for k, text in COMMON_KEYS)
    return (
        f"usage: {prog} [--config PRESET_OR_PATH]{extra} [key=value ...]\n"
        f"  presets: {', '.join(preset_names())}\n"
        f"  most used keys:\n{keys}\n"
        f"  example: {prog} --config mini-decathlon train.max_steps=100 seed=1\n"
        "  every key: docs/configuration.md"
    )
