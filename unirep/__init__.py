"""unirep: universal representations by distillation (multi-domain and multi-task)."""

__version__ = "0.3.0"
