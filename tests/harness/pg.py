"""Test-side name for the sandbox clusters (the same code runs the `make run` stack)."""

from deployments.sandbox import PgCluster, free_port, pg_bindir, pg_cluster, wait_until

__all__ = ["PgCluster", "free_port", "pg_bindir", "pg_cluster", "wait_until"]
