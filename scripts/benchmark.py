"""Time the real training step against a minimal loop; split a phase into its parts.

    python scripts/benchmark.py [--steps N] ... [--config PRESET_OR_PATH] [key=value ...]

The command is :mod:`teachers.commands.benchmark` (its options are there), installed as
``unirep-benchmark``; this file runs the same function from the repository.
"""

from teachers.commands.benchmark import cli

if __name__ == "__main__":
    cli("benchmark.py")
