"""``python -m unirep <command> ...`` and ``accelerate launch -m unirep <command> ...``."""

from unirep.cli import main

if __name__ == "__main__":
    main()
