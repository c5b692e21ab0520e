"""Stage one and two in one command: train missing teachers, then distil the student.

    accelerate launch scripts/distill.py [--config PRESET_OR_PATH] [key=value ...]

The command is :mod:`teachers.commands.distill` (its options are there), installed as
``unirep-distill``; this file runs the same function from the repository.
"""

from teachers.commands.distill import cli

if __name__ == "__main__":
    cli("distill.py")
