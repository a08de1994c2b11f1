"""Prefect blocks: where to connect (PostgresDatabase) and where to store (Prefect's own S3/local blocks)."""

from blocks.postgres import PostgresDatabase

__all__ = ["PostgresDatabase"]
