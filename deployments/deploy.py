"""`dbops deploy`: check prefect.yaml against the Prefect server, then `prefect deploy --all`.

`prefect deploy` accepts a deployment whose block does not exist, whose variable is missing (it becomes an
empty string) or whose work pool nobody created; the mistake then surfaces at 02:00 as a failed run.
Checking first turns each of those into one sentence, naming the deployment and the fix, before anything
is deployed or run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from flows.core.errors import ConfigurationError

ROOT = Path(__file__).resolve().parent.parent
VARIABLE_RE = re.compile(r"^\{\{\s*prefect\.variables\.([a-z0-9_]+)\s*\}\}$")
#: parameters that name a PostgresDatabase block / a storage block slug, per flow function
DATABASE_PARAMS: dict[str, tuple[str, ...]] = {
    "nightly_dump": ("database",),
    "base_backup": ("database",),
    "wal_archive_check": ("database",),
    "weekly_reindex": ("database",),
    "restore_drill": ("scratch",),
    "restore": ("target",),
    "list_backups": (),  # its `database` is the name in the object layout, not a block
    "migrate": ("database", "staging_database"),
    "pgbouncer_check": ("pgbouncer", "database"),
    "db_health": ("database",),
    "copy_backups": (),  # its `database` is the name in the object layout, not a block
}
DEFAULT_DATABASE_PARAMS = ("database",)
STORAGE_PARAMS = ("storage",)


def load_deployments(path: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{path} cannot be read as YAML ({exc}); fix the file") from None
    deployments = (data or {}).get("deployments") or []
    if not deployments:
        raise ConfigurationError(f"{path} has no deployments; add them under `deployments:`")
    return deployments


def check_deployments(path: Path = ROOT / "prefect.yaml") -> list[str]:
    """Every problem as one sentence; an empty list means `prefect deploy --all` can go ahead."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkPool
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound
    from prefect.variables import Variable

    from blocks.storage import load_block
    from deployments.pools import VARIANTS, job_variable_problems

    problems: list[str] = []
    checked_pools: dict[str, WorkPool | None] = {}  # None: the pool does not exist
    with get_client(sync_client=True) as client:
        for spec in load_deployments(path):
            name = spec.get("name", "?")
            function = str(spec.get("entrypoint", "")).rsplit(":", 1)[-1]
            database_params = DATABASE_PARAMS.get(function, DEFAULT_DATABASE_PARAMS)
            for schedule in spec.get("schedules") or []:
                try:
                    CronSchedule(cron=schedule.get("cron", ""), timezone=schedule.get("timezone") or "UTC")
                except Exception:  # pydantic says why at length; the sentence below says what to do
                    problems.append(
                        f"deployment {name}: schedule cron {schedule.get('cron')!r} / timezone "
                        f"{schedule.get('timezone')!r} does not parse; use five cron fields and an IANA zone"
                    )
            pool = (spec.get("work_pool") or {}).get("name")
            if pool and pool not in checked_pools:
                try:
                    checked_pools[pool] = client.read_work_pool(pool)
                except ObjectNotFound:
                    checked_pools[pool] = None
            if pool and checked_pools[pool] is None:
                # prefect.docker.yaml / prefect.k8s.yaml: their container pools; pitr-restore's stays process
                in_container = bool((spec.get("work_pool") or {}).get("job_variables"))
                pool_type = VARIANTS.get(path.name, "process") if in_container else "process"
                problems.append(
                    f"deployment {name}: work pool {pool!r} does not exist; run `dbops setup` or "
                    f"`prefect work-pool create {pool} --type {pool_type}`"
                )
            elif pool and (found := checked_pools[pool]) is not None:
                # The server accepts a job variable its pool's template does not define, and ignores it.
                job_variables = (spec.get("work_pool") or {}).get("job_variables") or {}
                if isinstance(job_variables, dict):
                    problems.extend(job_variable_problems(name, job_variables, found.base_job_template))
            # A deployment whose every schedule is paused (`active: false`: pgbouncer-check until the
            # installation has a PgBouncer) runs only once a person turns it on: its blocks may not exist yet.
            schedules = spec.get("schedules") or []
            paused = bool(schedules) and all(s.get("active") is False for s in schedules)
            for key, raw in (spec.get("parameters") or {}).items():
                value = raw
                if isinstance(raw, str) and (m := VARIABLE_RE.match(raw.strip())):
                    value = Variable.get(m.group(1), default=None)
                    if value in (None, ""):
                        problems.append(
                            f"deployment {name}: parameter {key} reads Prefect Variable {m.group(1)!r}, "
                            "which is not set; set it under [variables] in the dbops setup config"
                        )
                        continue
                if paused:
                    continue
                if key in database_params and isinstance(value, str):
                    problems.extend(_check_block(name, key, f"postgres-database/{value}", load_block))
                elif key in STORAGE_PARAMS and isinstance(value, str | list):
                    problems.extend(_check_storage(name, key, value, load_block))
    return problems


def _check_block(deployment: str, key: str, slug: str, load_block: Any) -> list[str]:
    try:
        load_block(slug)
    except ConfigurationError as exc:
        return [f"deployment {deployment}: parameter {key}: {exc}"]
    return []


def _check_storage(deployment: str, key: str, storage: str | list[Any], load_block: Any) -> list[str]:
    """A storage parameter may list a primary and its copies ("a,b" in a Prefect Variable): every block
    in it must exist."""
    from flows.core.locations import parse_locations

    try:
        locations = parse_locations(storage)
    except ConfigurationError as exc:
        return [f"deployment {deployment}: parameter {key}: {exc}"]
    return [problem for loc in locations for problem in _check_block(deployment, key, loc.block, load_block)]


def prefect_bin() -> str:
    """The `prefect` of this environment (uv's venv), whatever PATH says."""
    candidate = Path(sys.executable).parent / "prefect"
    return str(candidate) if candidate.exists() else "prefect"


def deploy(path: Path = ROOT / "prefect.yaml", out: Any = print, capture: Path | None = None) -> int:
    """Check, then `prefect deploy --all`; with `capture`, its output goes to that file instead of the
    terminal (the local stack keeps its banner its own)."""
    problems = check_deployments(path)
    if problems:
        for problem in problems:
            out(f"dbops deploy: {problem}")
        out(f"dbops deploy: nothing deployed ({len(problems)} problem(s) in {path.name})")
        return 1
    argv = [prefect_bin(), "--no-prompt", "deploy", "--all"]
    if path.resolve() != (ROOT / "prefect.yaml").resolve():
        argv += ["--prefect-file", str(path)]
    if capture is None:
        return subprocess.run(argv, cwd=ROOT, check=False).returncode
    with capture.open("ab") as sink:
        return subprocess.run(argv, cwd=ROOT, check=False, stdout=sink, stderr=subprocess.STDOUT).returncode
