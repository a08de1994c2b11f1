# The two commands a fresh machine needs: `make run` (the main job on the embedded default) and `make test`.
SHELL := /bin/bash
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: setup run test lint bench clean

setup:
	@bash .ci/install-deps
	uv sync --frozen

run: setup
	uv run python -m deployments.stack

test: setup
	uv run pytest -q

lint:
	uv run ruff check .

bench: setup
	uv run python -m bench.bench_dump

clean:
	rm -rf .state
