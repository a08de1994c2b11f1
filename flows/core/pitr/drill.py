"""The PITR drill's own parts: the canary on production, the checks of the recovered copy, the sidecar.

The drill proves the recovery point, not only that a restore starts: a random token written on production
just before a restore point must be in the copy recovered to that restore point. Its record goes beside
the base backup it used (`<stem>.pitr-drill.json`): RPO (how old the newest archived WAL was when the
drill started: what a disaster at that moment would have lost), RTO, WAL replayed, and the result.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql
from pydantic import AwareDatetime, BaseModel, Field

from flows.core.childenv import child_environment
from flows.core.drill import CheckResult
from flows.core.errors import DbopsError
from flows.core.manifest import Manifest
from flows.core.objectstore import ObjectStore
from flows.core.pgtools import PgTool, error_summary
from flows.core.tablenames import TableName, resolve_key
from flows.core.wal import parse_lsn

PITR_DRILL_FORMAT_VERSION = 1
CANARY_SCHEMA = "dbops"
CANARY_TABLE = "pitr_canary"


class PitrDrillCheck(BaseModel):
    name: str
    ok: bool
    detail: str


class PitrDrillRecord(BaseModel):
    """`<stem>.pitr-drill.json`: the last PITR drill that recovered from this base backup. No secrets."""

    format_version: int = PITR_DRILL_FORMAT_VERSION
    kind: str = "pitr-drill"
    database: str
    base_backup: str = Field(description="tar key of the base backup recovered from.")
    flow_run_id: str | None = None
    started_at: AwareDatetime
    finished_at: AwareDatetime
    passed: bool
    message: str = Field(default="", description="The failure's one sentence, empty when passed.")
    restore_point: str
    restore_point_lsn: str | None = None
    rpo_seconds: float | None = Field(
        default=None, description="Age of the newest archived WAL segment when the drill started."
    )
    rto_seconds: float | None = None
    download_seconds: float | None = None
    replay_seconds: float | None = None
    start_seconds: float | None = None
    wal_segments_replayed: int | None = None
    bytes_downloaded: int | None = None
    reached_lsn: str | None = None
    timeline: int | None = None
    missing_segment: str | None = None
    checks: list[PitrDrillCheck] = Field(default_factory=list)
    location: str = Field(default="", description="The storage location the base backup was read from.")
    fallbacks: list[str] = Field(
        default_factory=list, description="Locations passed over before it, each with why."
    )

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()


@dataclass
class Canary:
    token: str
    restore_point: str
    restore_point_lsn: str
    walfile: str
    timeline: int


def restore_point_name(run_id: str) -> str:
    return f"dbops-drill-{run_id}"[:63]


def write_canary(conn: psycopg.Connection, restore_point: str, run_id: str, write: bool = True) -> Canary:
    """On production: the token (unless `write` is false), the restore point, and a WAL switch, so the
    segment holding both can be archived and waited for."""
    token = secrets.token_hex(16) if write else ""
    if write:
        schema, table = sql.Identifier(CANARY_SCHEMA), sql.Identifier(CANARY_SCHEMA, CANARY_TABLE)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (token text PRIMARY KEY, run_id text NOT NULL,"
                " written_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        conn.execute(sql.SQL("INSERT INTO {} (token, run_id) VALUES (%s, %s)").format(table), (token, run_id))
    with conn.transaction():  # first the restore point, then the switch that closes its segment
        point = conn.execute("SELECT pg_create_restore_point(%s)::text", (restore_point,)).fetchone()
        switched = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
    assert point is not None
    assert switched is not None
    rp_lsn, walfile = point[0], switched[0]
    return Canary(token, restore_point, str(rp_lsn), str(walfile), int(str(walfile)[:8], 16))


def check_canary(conn: psycopg.Connection, token: str) -> CheckResult:
    table = sql.Identifier(CANARY_SCHEMA, CANARY_TABLE)
    try:
        row = conn.execute(
            sql.SQL("SELECT written_at FROM {} WHERE token = %s").format(table), (token,)
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return CheckResult("canary", False, f"{CANARY_SCHEMA}.{CANARY_TABLE} is not in the recovered copy")
    if row is None:
        return CheckResult(
            "canary", False, "the token written before the restore point is not in the recovered copy"
        )
    return CheckResult("canary", True, f"token written at {row[0].isoformat(timespec='seconds')} is there")


def check_tables(conn: psycopg.Connection, manifest: Manifest | None) -> CheckResult:
    if manifest is None:
        return CheckResult("tables", True, "no dump to compare with (skipped)")
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p')"
    ).fetchall()
    present = {TableName(r[0], r[1]) for r in rows}
    missing = [k for k in manifest.row_estimates if resolve_key(k, present) is None]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        return CheckResult(
            "tables", False, f"{len(missing)} table(s) of the latest dump are missing: {shown}"
        )
    return CheckResult("tables", True, f"all {len(manifest.row_estimates)} table(s) of the latest dump exist")


def check_position(reached_lsn: str | None, timeline: int | None, canary: Canary) -> CheckResult:
    """Recovery stopped at the restore point: replayed at least to it, and promoted onto a new timeline."""
    if reached_lsn is None or parse_lsn(reached_lsn) < parse_lsn(canary.restore_point_lsn):
        return CheckResult(
            "position",
            False,
            f"replay reached {reached_lsn}, before the restore point at {canary.restore_point_lsn}",
        )
    if timeline is None or timeline <= canary.timeline:
        return CheckResult(
            "position",
            False,
            f"the recovered server is on timeline {timeline}, expected after {canary.timeline}",
        )
    return CheckResult(
        "position",
        True,
        f"replayed to {reached_lsn} (restore point at {canary.restore_point_lsn}), timeline {timeline}",
    )


def run_amcheck(
    tool: PgTool, socket_dir: str, port: int, user: str, dbname: str, timeout_s: float = 3600
) -> CheckResult:
    """pg_amcheck --install-missing on the recovered copy, through its private socket (no password)."""
    argv = [
        str(tool.path),
        "--no-password",
        "--install-missing",
        "-h",
        socket_dir,
        "-p",
        str(port),
        "-U",
        user,
        dbname,
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, env=child_environment(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return CheckResult("amcheck", False, f"pg_amcheck did not finish in {timeout_s:.0f} s")
    out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    if proc.returncode != 0:
        first = error_summary(out) or (out.splitlines()[0] if out else f"exit {proc.returncode}")
        return CheckResult("amcheck", False, f"pg_amcheck found problems ({first})")
    return CheckResult("amcheck", True, "pg_amcheck: heap and B-tree indexes are consistent")


def rpo_seconds(newest_archived_at: datetime | None, started_at: datetime) -> float | None:
    return None if newest_archived_at is None else max(0.0, (started_at - newest_archived_at).total_seconds())


def last_pitr_drill(store: ObjectStore, prefix: str, database: str) -> PitrDrillRecord | None:
    """The newest PITR drill record beside any base backup of `database` (for `dbops backups list`)."""
    from flows.core.base_layout import PITR_DRILL_SUFFIX, base_prefix, parse_base_key

    newest: PitrDrillRecord | None = None
    for info in store.list(base_prefix(prefix, database)):
        parsed = parse_base_key(info.key, prefix, database)
        if parsed is None or parsed[1] != PITR_DRILL_SUFFIX:
            continue
        try:
            record = PitrDrillRecord.model_validate_json(store.get_bytes(info.key))
        except (ValueError, DbopsError):
            continue
        if newest is None or record.finished_at > newest.finished_at:
            newest = record
    return newest


def describe_pitr_drill(record: PitrDrillRecord | None) -> str:
    if record is None:
        return "no PITR drill yet"
    when = record.finished_at.isoformat(timespec="seconds")
    if not record.passed:
        return f"last PITR drill FAILED {when}: {record.message}"
    rpo = f"{record.rpo_seconds:.0f} s" if record.rpo_seconds is not None else "unknown"
    rto = f"{record.rto_seconds:.0f} s" if record.rto_seconds is not None else "unknown"
    return f"last PITR drill passed {when} (RPO {rpo}, RTO {rto})"
