"""Stage one alone: train (or verify) one teacher per task (a domain, or a dense task).

    accelerate launch scripts/train_teachers.py [--config PRESET_OR_PATH] [key=value ...]

The command is :mod:`teachers.commands.train_teachers` (its options are there), installed as
``unirep-train-teachers``; this file runs the same function from the repository.
"""

from teachers.commands.train_teachers import cli

if __name__ == "__main__":
    cli("train_teachers.py")
