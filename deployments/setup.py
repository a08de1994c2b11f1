"""`dbops setup`: everything the flows need on a Prefect server, created idempotently.

Registers our block types, creates database and storage blocks from a config file or the environment
(passwords stored as SecretStr, never echoed), the work pool, one global concurrency limit
`db:<system identifier>:<database>` per database (it connects to learn the server's identity, so every
block and spelling of one database shares one limit; a database it cannot reach is reported, not
guessed), and, when a notification block is named, the alerts of deployments/alerts.py: an automation
that notifies on any Failed or Crashed run of a dbops deployment, and per deployment a "nothing ran" one
(no Completed nightly-dump for 26 h, wal-archive-check for 1 h, base-backup for its interval + margin) and
a "resolved" one. Running it twice changes nothing: each item is reported as created,
updated (the config changed) or existing.

Config file (TOML):

    work_pool = "dbops"
    notify = "slack-webhook/dbops-alerts"        # optional: a notification block slug

    [alerts]                                      # optional: "nothing ran" windows (deployments/alerts.py)
    windows = { nightly-dump = "26h", wal-archive-check = "1h" }  # flow or deployment name = duration
    base_backup_margin = "2h"                     # base-backup: its schedule's interval plus this

    [databases.imagemanager-prod]
    url = "postgresql://dbops@db1.internal:5432/imagemanager?sslmode=verify-full"
    password_env = "IMAGEMANAGER_PROD_PASSWORD"   # the password comes from this variable
    protected = true
    # PostgreSQL's own URL, not the application's DATABASE_URL through PgBouncer (:6432), which is refused;
    # allow_pooler = true accepts a pooler in session mode only

    [databases.imagemanager-pgbouncer]            # optional: PgBouncer's console, for pgbouncer-check
    url = "postgresql://stats@pgbouncer.internal:6432/pgbouncer"
    password_env = "PGBOUNCER_STATS_PASSWORD"

    [storage.imagemanager-backups]
    type = "s3"
    bucket = "imagemanager-backups"
    folder = "dbops"
    region = "eu-west-1"
    endpoint_url = "https://minio.internal:9000"  # optional: MinIO or another S3-compatible store
    access_key_id_env = "BACKUP_AWS_ACCESS_KEY_ID"
    secret_access_key_env = "BACKUP_AWS_SECRET_ACCESS_KEY"

    [storage.local-backups]
    type = "local"
    path = "/var/backups/dbops"

    [variables]                                   # what prefect.yaml's {{ prefect.variables.* }} become
    dbops_storage = "s3-bucket/imagemanager-backups"
    dbops_wal_archive = { storage = "s3-bucket/imagemanager-wal", prefix = "prod/wal_005" }

Environment instead of a file: `DBOPS_DATABASE_<NAME>=postgresql://user:password@host/db` and
`DBOPS_STORAGE_<NAME>=s3://bucket/folder` or `file:///path` (NAME lowercased, `_` becomes `-`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, Field, SecretStr, ValidationError

from deployments.alerts import BASE_BACKUP, FAILED_AUTOMATION, MISSING_PREFIX, AlertConfig, failed_automation
from flows.core.errors import ConfigurationError
from flows.core.health.pooler import ADMIN_DATABASE
from flows.core.redact import validation_summary

Status = Literal["created", "updated", "exists", "registered", "not created", "removed"]


class DatabaseConfig(BaseModel):
    url: str = Field(description="postgresql:// URL; a password in it is moved into the block's SecretStr.")
    password_env: str | None = Field(default=None, description="Environment variable holding the password.")
    protected: bool = Field(default=False, description="Production: restores into it need confirm.")
    application_name: str = Field(default="dbops", description="application_name of dbops sessions.")
    allow_pooler: bool = Field(
        default=False,
        description="Accept a connection pooler in session mode between dbops and PostgreSQL (see README).",
    )


class StorageConfig(BaseModel):
    type: Literal["s3", "local"] = Field(description="s3 (any S3-compatible store) or local directory.")
    bucket: str | None = Field(default=None, description="S3 bucket name.")
    folder: str = Field(default="", description="Folder inside the bucket.")
    region: str | None = Field(default=None, description="AWS region.")
    endpoint_url: str | None = Field(default=None, description="Endpoint of an S3-compatible store.")
    access_key_id_env: str | None = Field(default=None, description="Variable holding the access key id.")
    secret_access_key_env: str | None = Field(default=None, description="Variable holding the secret key.")
    path: str | None = Field(default=None, description="Directory for local storage.")


class SetupConfig(BaseModel):
    work_pool: str = Field(default="dbops", description="Process work pool the deployments run on.")
    notify: str | None = Field(default=None, description="Notification block slug to alert on failures.")
    databases: dict[str, DatabaseConfig] = Field(default_factory=dict)
    storage: dict[str, StorageConfig] = Field(default_factory=dict)
    alerts: AlertConfig = Field(
        default_factory=AlertConfig,
        description="Windows of the 'nothing ran' alerts (see deployments/alerts.py); used with notify.",
    )
    variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Prefect Variables that prefect.yaml reads: dbops_storage (a storage block slug) and "
        "dbops_wal_archive (a table: storage + prefix, or directory).",
    )
    crash_detection_seconds: int = Field(
        default=600,
        ge=0,
        description="A flow run that sent no heartbeat for this long (and did not end) lost its worker or "
        "host and is marked Crashed. Must exceed the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's "
        "default 180 s; the Docker/Kubernetes variants and make run use 30) with a margin, or a live run "
        "would be marked Crashed; 0: no such automation.",
    )


def load_config(path: Path | None, environ: Mapping[str, str] = os.environ) -> SetupConfig:
    """The config file when given, plus DBOPS_DATABASE_* / DBOPS_STORAGE_* from the environment."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"config file {path} does not exist; pass an existing file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"config file {path} is not valid TOML ({exc}); fix it") from None
    data.setdefault("databases", {})
    data.setdefault("storage", {})
    for key, value in environ.items():
        if key.startswith("DBOPS_DATABASE_") and value:
            data["databases"].setdefault(_env_name(key, "DBOPS_DATABASE_"), {"url": value})
        elif key.startswith("DBOPS_STORAGE_") and value:
            data["storage"].setdefault(_env_name(key, "DBOPS_STORAGE_"), _storage_from_url(value, key))
    if environ.get("DBOPS_NOTIFY") and not data.get("notify"):
        data["notify"] = environ["DBOPS_NOTIFY"]
    try:
        return SetupConfig.model_validate(data)
    except ValidationError as exc:
        # field names only: pydantic's text quotes each bad value, which may be a URL with a password
        raise ConfigurationError(f"the dbops setup config is invalid: {validation_summary(exc)}") from None


def _env_name(key: str, prefix: str) -> str:
    return key[len(prefix) :].lower().replace("_", "-")


def _storage_from_url(url: str, variable: str) -> dict[str, Any]:
    try:
        parsed = urlparse(url)
    except ValueError:
        parsed = urlparse("")
    if parsed.scheme == "s3":
        return {"type": "s3", "bucket": parsed.netloc, "folder": parsed.path.strip("/")}
    if parsed.scheme == "file":
        return {"type": "local", "path": parsed.path}
    raise ConfigurationError(
        f"the storage URL in {variable} is not s3://bucket/folder or file:///path; fix it (the URL is not "
        "shown: it may hold a credential)"
    )


@dataclass
class SetupReport:
    items: list[tuple[str, str, Status]] = field(default_factory=list)

    def add(self, kind: str, name: str, status: Status) -> None:
        self.items.append((kind, name, status))

    @property
    def changed(self) -> bool:
        return any(status in ("created", "updated", "removed") for _, _, status in self.items)

    def render(self) -> str:
        width = max((len(f"{k} {n}") for k, n, _ in self.items), default=10)
        return "\n".join(f"  {f'{k} {n}':<{width}}  {s}" for k, n, s in self.items)


# -- the steps ---------------------------------------------------------------------------------------------


def register_block_types(report: SetupReport) -> None:
    from prefect.filesystems import LocalFileSystem
    from prefect_aws import AwsCredentials, S3Bucket

    from blocks import PostgresDatabase

    for block_type in (PostgresDatabase, AwsCredentials, S3Bucket, LocalFileSystem):
        block_type.register_type_and_schema()
        report.add("block type", block_type.get_block_type_slug(), "registered")


def _save_block(block: Any, name: str, kind: str, report: SetupReport, slug: str) -> None:
    """Save when missing or different; compare secrets by value so an unchanged config is a no-op."""
    try:
        existing = type(block).load(name)
    except ValueError:
        block.save(name)
        report.add(kind, f"{slug}/{name}", "created")
        return
    if _plain(existing) == _plain(block):
        report.add(kind, f"{slug}/{name}", "exists")
        return
    block.save(name, overwrite=True)
    report.add(kind, f"{slug}/{name}", "updated")


def _plain(value: Any) -> Any:
    from pydantic import BaseModel as _Base

    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, _Base):
        return {k: _plain(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def database_block(name: str, cfg: DatabaseConfig, environ: Mapping[str, str]) -> Any:
    from blocks import PostgresDatabase

    overrides: dict[str, object] = {
        "protected": cfg.protected,
        "application_name": cfg.application_name,
        "allow_pooler": cfg.allow_pooler,
    }
    if cfg.password_env:
        if not environ.get(cfg.password_env):
            raise ConfigurationError(
                f"database {name}: environment variable {cfg.password_env} is not set; "
                "export the password in it"
            )
        overrides["password"] = environ[cfg.password_env]
    try:
        return PostgresDatabase.from_url(cfg.url, **overrides)
    except ConfigurationError as exc:  # one sentence without the URL or any value from it
        raise ConfigurationError(f"database {name}: {exc}") from None
    except Exception as exc:  # anything else may quote the URL: name the kind of failure only
        raise ConfigurationError(
            f"database {name}: the URL is not usable ({type(exc).__name__}); fix it (the URL is not shown: "
            "it may hold a password)"
        ) from None


def refuse_pooler(name: str, block: Any) -> None:
    """The application's DATABASE_URL goes through PgBouncer (port 6432); a person copies it into the
    config. Refuse it before anything is created and ask for PostgreSQL's own URL: found on the line with
    the flows' own check, or, when the server cannot be reached from here, by PgBouncer's default port.
    A block for PgBouncer's console (database `pgbouncer`, for pgbouncer-check) is what it says."""
    from flows.core.errors import ConnectionPoolerInTheWay, ConnectionRouteUnknown, DbopsError
    from flows.core.health.pooler import ADMIN_DATABASE
    from flows.core.pooler import PGBOUNCER_DEFAULT_PORT, connect_direct

    if block.database == ADMIN_DATABASE:
        return
    direct_url = "in the dbops setup config give PostgreSQL's own URL, not the application's DATABASE_URL"
    try:
        conn, _ = connect_direct(block.params(), allow_pooler=block.allow_pooler, block=name)
        conn.close()
        return  # PostgreSQL itself (or a plain TCP forward, or an allowed session pooler) answered
    except (ConnectionPoolerInTheWay, ConnectionRouteUnknown) as exc:
        raise ConfigurationError(f"{exc} ({direct_url})") from None
    except DbopsError:
        pass  # not reachable from here (every flow checks again in its preflight); the port still says a lot
    if block.port == PGBOUNCER_DEFAULT_PORT and not block.allow_pooler:
        raise ConfigurationError(
            f"database {name}: port {PGBOUNCER_DEFAULT_PORT} is PgBouncer's, and {block.host}:{block.port} "
            f"could not be checked from here; {direct_url} (PostgreSQL's port, usually 5432): pg_dump's "
            "snapshot, the migration lock and lock_timeout need a real session (allow_pooler = true only "
            "for a pooler in session mode)"
        )


def storage_block(name: str, cfg: StorageConfig, environ: Mapping[str, str]) -> tuple[Any, str]:
    if cfg.type == "local":
        from prefect.filesystems import LocalFileSystem

        if not cfg.path:
            raise ConfigurationError(f"storage {name}: type local needs path")
        Path(cfg.path).mkdir(parents=True, exist_ok=True)
        return LocalFileSystem(basepath=cfg.path), "local-file-system"
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    if not cfg.bucket:
        raise ConfigurationError(f"storage {name}: type s3 needs bucket")

    def secret(var: str | None) -> str | None:
        if var and not environ.get(var):
            raise ConfigurationError(f"storage {name}: environment variable {var} is not set; export it")
        return environ.get(var) if var else None

    creds = AwsCredentials(
        aws_access_key_id=secret(cfg.access_key_id_env),
        aws_secret_access_key=secret(cfg.secret_access_key_env),
        region_name=cfg.region,
        aws_client_parameters=AwsClientParameters(endpoint_url=cfg.endpoint_url),
    )
    return S3Bucket(bucket_name=cfg.bucket, bucket_folder=cfg.folder, credentials=creds), "s3-bucket"


def ensure_work_pool(name: str, report: SetupReport) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            report.add("work pool", name, "exists")
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                report.add("work pool", name, "created")
            except ObjectAlreadyExists:
                report.add("work pool", name, "exists")


def ensure_limit(name: str, report: SetupReport) -> None:
    from flows.tasks.common import ensure_concurrency_limit

    report.add("concurrency limit", name, "created" if ensure_concurrency_limit(name) else "exists")


def ensure_database_limit(block_name: str, block: Any, report: SetupReport) -> None:
    """The limit the flows take for this block's database: named after what the server says it is.

    A server that cannot be reached gets no limit rather than a wrong one; the flows create it on their
    first run (they identify the database the same way).
    """
    from flows.core.errors import DbopsError
    from flows.core.identity import limit_name, resolve

    try:
        identity = resolve(block.params())
    except DbopsError as exc:
        why = f"for {block_name} (cannot connect to learn its name: {exc})"
        report.add("concurrency limit", why, "not created")
        return
    ensure_limit(limit_name(identity), report)


AUTOMATION_NAME = FAILED_AUTOMATION


def ensure_notification(notify: str, report: SetupReport, alerts: AlertConfig | None = None) -> None:
    """The alerts of deployments/alerts.py, sent to the notification block: one automation for any Failed
    or Crashed dbops run, and per dbops deployment on the server a "nothing ran" one (periodic jobs) and a
    "resolved" one. Deployments deployed after this ran get theirs from the next `dbops setup`."""

    from blocks.storage import load_sync
    from deployments.alerts import (
        arm,
        deployment_alerts,
        ensure_automation,
        remove_stale_alerts,
        watched_deployments,
    )

    try:
        block = load_sync(notify)
    except ValueError:
        raise ConfigurationError(
            f"notification block {notify!r} does not exist; create it in the Prefect UI or fix `notify`"
        ) from None
    block_id = block._block_document_id
    if block_id is None:  # a saved block always has one; say so rather than send alerts nowhere
        raise ConfigurationError(f"notification block {notify!r} has no document id; save it again")
    watched = watched_deployments(alerts or AlertConfig())  # config errors before anything changes
    report.add("automation", AUTOMATION_NAME, ensure_automation(failed_automation(block_id)))
    if not watched:
        report.add(
            "automation",
            "per deployment (no dbops deployment on the server yet: run dbops setup again after deploy)",
            "not created",
        )
    for w in watched:
        if w.window is None and BASE_BACKUP in (w.flow, w.deployment):
            report.add(
                "automation",
                f"{MISSING_PREFIX}{w.full_name} (no active schedule to derive its window from; set "
                f"[alerts] windows.{w.deployment})",
                "not created",
            )
    kept: list[str] = []
    for w in watched:
        changed = False
        for automation in deployment_alerts(block_id, [w]):
            status = ensure_automation(automation)
            changed = changed or status != "exists"
            kept.append(automation.name)
            report.add("automation", automation.name, status)
        if changed and w.window is not None:
            arm(w)
    for name in remove_stale_alerts(kept):  # its deployment is gone, or its kind no longer applies
        report.add("automation", name, "removed")


def ensure_crash_detection_automation(within_seconds: int, report: SetupReport) -> None:
    """A run whose worker or host is lost sends no final state; without this automation it stays Running
    forever and the failure alert never fires (deployments/crash_detection.py). The default window (10
    min) is safe for Prefect's default heartbeat (180 s): too short a window would crash live runs."""
    from deployments.crash_detection import CRASH_AUTOMATION, ensure_crash_detection

    if within_seconds:
        report.add("automation", CRASH_AUTOMATION, ensure_crash_detection(within_seconds))


def run_setup(config: SetupConfig, environ: Mapping[str, str] = os.environ) -> SetupReport:
    report = SetupReport()
    # Build every block first: a config error must stop setup before it changes anything.
    dbs = {name: database_block(name, cfg, environ) for name, cfg in config.databases.items()}
    stores = {name: storage_block(name, cfg, environ) for name, cfg in config.storage.items()}
    for name, block in dbs.items():
        refuse_pooler(name, block)
    register_block_types(report)
    for name, block in dbs.items():
        _save_block(block, name, "block", report, "postgres-database")
    for name, (block, slug) in stores.items():
        _save_block(block, name, "block", report, slug)
    ensure_work_pool(config.work_pool, report)
    for name, block in dbs.items():
        if block.database != ADMIN_DATABASE:  # PgBouncer's console is watched, never dumped or locked
            ensure_database_limit(name, block, report)
    if config.variables:
        set_variables(config.variables, report)
    ensure_crash_detection_automation(config.crash_detection_seconds, report)
    if config.notify:
        ensure_notification(config.notify, report, config.alerts)
    return report


# -- Prefect Variables: what prefect.yaml's `{{ prefect.variables.* }}` resolve to -------------------------


def set_variables(values: Mapping[str, Any], report: SetupReport | None = None) -> SetupReport:
    """Create or update Variables; an unchanged value is left alone so a rerun reports `exists`."""
    from prefect.variables import Variable

    report = report if report is not None else SetupReport()
    for name, value in values.items():
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ConfigurationError(
                f"variable name {name!r} is not allowed; use lowercase letters, digits and underscores"
            )
        current = Variable.get(name, default=None)
        if current == value:
            report.add("variable", name, "exists")
            continue
        Variable.set(name, value, overwrite=True)
        report.add("variable", name, "created" if current is None else "updated")
    return report


def read_variable(name: str) -> str | None:
    from prefect.variables import Variable

    value = Variable.get(name, default=None)
    return None if value is None else str(value)
