"""dbops flows: one module per user-facing job, reading like the runbook it replaces."""

__version__ = "0.1.0"
