"""Evaluate an exported student on a split; writes metrics.json in the run-directory format.

    accelerate launch scripts/evaluate.py --config PRESET student=runs/<run>/student split=test

The command is :mod:`teachers.commands.evaluate` (its options are there), installed as
``unirep-evaluate``; this file runs the same function from the repository.
"""

from teachers.commands.evaluate import cli

if __name__ == "__main__":
    cli("evaluate.py")
