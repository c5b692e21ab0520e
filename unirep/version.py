"""The package version, in one place (manifests record it; ``unirep.__version__`` reads it)."""

__version__ = "0.7.0"
