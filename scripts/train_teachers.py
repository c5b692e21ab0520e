"""Stage one alone: train (or verify) one teacher per task.

``unirep train-teachers``, see :mod:`unirep.cli.train_teachers`.
"""

from unirep.cli import main

if __name__ == "__main__":
    main(command="train-teachers", prog="train_teachers.py")
