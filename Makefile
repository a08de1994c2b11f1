# The two commands a fresh machine needs: `make run` (the main job on the embedded default) and `make test`.
SHELL := /bin/bash
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: setup run test lint fmt typecheck bench bench-all clean

setup:
	@bash .ci/install-deps
	uv sync --frozen

# `make run NOTIFY=1`: alerts (failed, nothing ran, resolved) go to a local receiver that prints them here.
# `make run DBOPS_PREFECT_DB=postgres` (or =postgresql+asyncpg://...): the Prefect server on PostgreSQL.
# `make run WORKERS=2`: two process workers, each from its own directory, as on separate hosts.
run: setup
	uv run python -m deployments.stack $(if $(NOTIFY),--notify-local) $(if $(WORKERS),--workers $(WORKERS))

test: setup
	uv run pytest -q -n 2 --dist loadfile

lint:
	uv run ruff check .
	uv run ruff format --check .

fmt:
	uv run ruff format .
	uv run ruff check --fix .

typecheck:
	uv run mypy

bench: setup
	uv run python -m bench.bench_dump

# Every bench, one after the other; each prints its comparison and PASS/FAIL lines (a FAIL does not stop
# the others: the leading `-`).
bench-all: setup
	-uv run python -m bench.bench_dump
	-uv run python -m bench.bench_copies
	-uv run python -m bench.bench_restore
	-uv run python -m bench.bench_wal
	-uv run python -m bench.bench_reindex
	-uv run python -m bench.bench_health

clean:
	rm -rf .state
