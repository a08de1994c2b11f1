"""Turn an extracted base backup into a cluster that recovers and harms nothing.

A base backup carries production's configuration: its archive_command (started as is, the copy would
archive a new timeline into production's archive), primary_conninfo (perhaps with a password), replication
slots, production's listen_addresses and port. Before the first start this module:
- writes `recovery.signal` (PostgreSQL 12+; `recovery.conf` is gone) and removes `standby.signal`;
- removes settings that must not survive from postgresql.auto.conf and comments them out in
  postgresql.conf (primary_conninfo, restore/archive commands, earlier recovery targets, ...), so no
  credential of production's stays in the recovered files;
- appends dbops' own block to postgresql.auto.conf: the restore_command (a local spool script, no
  credentials), the target, `archive_mode = off`, local-only listening, a private socket directory, a new
  cluster_name, the port, logs to stderr (the flow reads them), hot_standby on (to watch progress);
- writes its own pg_hba file: trust on the private socket directory (mode 0700, reachable only by the
  server's OS user and root, who can read the data files anyway), md5/scram on localhost as production has
  its passwords; and empties pg_replslot.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

#: settings dbops decides for the recovered cluster; any earlier value (auto.conf or postgresql.conf) goes
OVERRIDDEN = frozenset(
    {
        "primary_conninfo",
        "primary_slot_name",
        "restore_command",
        "archive_command",
        "archive_library",
        "archive_mode",
        "archive_cleanup_command",
        "recovery_end_command",
        "recovery_target",
        "recovery_target_time",
        "recovery_target_lsn",
        "recovery_target_name",
        "recovery_target_xid",
        "recovery_target_inclusive",
        "recovery_target_action",
        "recovery_target_timeline",
        "promote_trigger_file",
        "listen_addresses",
        "port",
        "unix_socket_directories",
        "unix_socket_permissions",
        "unix_socket_group",
        "cluster_name",
        "hba_file",
        "ident_file",
        "data_directory",
        "external_pid_file",
        "ssl",
        "logging_collector",
        "log_destination",
        "hot_standby",
        "synchronous_standby_names",
        "lc_messages",
    }
)
HBA_NAME = "pg_hba.dbops-pitr.conf"
IDENT_NAME = "pg_ident.dbops-pitr.conf"
MARK = "# dbops point-in-time recovery"
_SETTING_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(=|\s)")


def quote(value: str) -> str:
    """A configuration-file string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def _setting_of(line: str) -> str | None:
    m = _SETTING_RE.match(line)
    return m.group(1).lower() if m else None


def _rewrite(path: Path, drop: bool) -> None:
    """Remove (auto.conf) or comment out (postgresql.conf) every OVERRIDDEN setting."""
    if not path.exists():
        return
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if _setting_of(line) in OVERRIDDEN:
            if not drop:
                out.append(f"# removed by dbops point-in-time recovery: {_setting_of(line)} = ...")
            continue
        out.append(line)
    path.write_text("\n".join(out) + "\n")


def recovery_settings(
    *,
    restore_command: str,
    target: Mapping[str, str],
    port: int,
    socket_dir: Path,
    cluster_name: str,
    listen_addresses: str = "localhost",
    data_directory: Path,
) -> dict[str, str]:
    """The values dbops writes (unquoted); `quote` is applied per setting in `write_recovery_config`."""
    return {
        "restore_command": restore_command,
        **target,
        "archive_mode": "off",
        "listen_addresses": listen_addresses,
        "port": str(port),
        "unix_socket_directories": str(socket_dir),
        "unix_socket_permissions": "0700",
        "cluster_name": cluster_name,
        "hba_file": str(data_directory / HBA_NAME),
        "ident_file": str(data_directory / IDENT_NAME),
        "ssl": "off",
        "logging_collector": "off",
        "log_destination": "stderr",
        "hot_standby": "on",
        "lc_messages": "C",  # the flow reads the log: its lines must be PostgreSQL's English ones
        "primary_conninfo": "",
        "primary_slot_name": "",
    }


_NUMERIC = frozenset({"port"})
_BARE = frozenset({"archive_mode", "ssl", "logging_collector", "hot_standby", "recovery_target_inclusive"})


def write_recovery_config(data_directory: Path, settings: Mapping[str, str]) -> None:
    _rewrite(data_directory / "postgresql.auto.conf", drop=True)
    conf = data_directory / "postgresql.conf"
    if conf.exists():
        _rewrite(conf, drop=False)
    else:  # Debian and others keep it in /etc: the backup has none
        conf.write_text(f"{MARK}: the base backup carried no postgresql.conf; defaults apply\n")
    lines = [f"{MARK}: settings for the recovered copy (never archives, listens locally)"]
    for key, value in settings.items():
        lines.append(f"{key} = {value if key in _NUMERIC or key in _BARE else quote(value)}")
    with (data_directory / "postgresql.auto.conf").open("a") as f:
        f.write("\n".join(lines) + "\n")
    (data_directory / HBA_NAME).write_text(
        f"{MARK}: the private socket directory (0700) is trusted; TCP on localhost asks for passwords\n"
        "local all all trust\n"
        "host all all 127.0.0.1/32 md5\n"
        "host all all ::1/128 md5\n"
    )
    (data_directory / IDENT_NAME).write_text(f"{MARK}: no user name maps\n")
    for name in ("standby.signal", "postmaster.pid", "postmaster.opts"):
        (data_directory / name).unlink(missing_ok=True)
    (data_directory / "recovery.signal").write_text("")
    slots = data_directory / "pg_replslot"
    if slots.is_dir():
        for child in slots.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
