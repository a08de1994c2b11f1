"""Benchmarks: `uv run python -m bench.bench_dump` (see bench/README.md)."""
