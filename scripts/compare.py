"""Variants × seeds on one preset, then one table (mean ± std over seeds) and a plot.

    accelerate launch scripts/compare.py --config PRESET --seeds 0,1,2 [--variants ...] [k=v ...]

The command is :mod:`teachers.commands.compare` (its options are there), installed as
``unirep-compare``; this file runs the same function from the repository.
"""

from teachers.commands.compare import cli

if __name__ == "__main__":
    cli("compare.py")
