"""The sample application (examples/imagemanager) brought to its Alembic head, as `make run` and the benches
do it. No side effects on import (deployments/demo.py sets Prefect's environment; this does not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "imagemanager"


def alembic_upgrade(
    host: str, port: int, user: str, password: str, database: str, quiet: bool = False
) -> None:
    """Run the application's own Alembic in a subprocess, as migrate will (DATABASE_URL + PGPASSWORD).
    `quiet` keeps Alembic's INFO lines out of the terminal (shown only when it fails)."""
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql+psycopg://{user}@{host}:{port}/{database}",
        "PGPASSWORD": password,
    }
    argv = [sys.executable, "-m", "alembic", "upgrade", "head"]
    if not quiet:
        subprocess.run(argv, cwd=SAMPLE, env=env, check=True)
        return
    done = subprocess.run(argv, cwd=SAMPLE, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"alembic upgrade head of the sample application on {database} failed:\n{tail}")
