"""Sandbox PostgreSQL clusters: throwaway ones for tests and benches, a persistent one for `make run`.

Real servers, not mocks: `initdb` into a temporary directory, a free port on 127.0.0.1, scram-sha-256
password authentication on TCP (so a wrong password is a real failure), per-cluster settings (archive_mode,
archive_command, wal_level...), and always torn down. When running as root, the server runs as the
`postgres` OS user because `initdb` refuses root.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from flows.core.errors import StackError


def pg_bindir() -> Path:
    """Where the server binaries are: Debian keeps them off PATH, `pg_config --bindir` knows."""
    env = os.environ.get("DBOPS_PG_BINDIR")
    if env:
        return Path(env)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    try:
        out = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True).stdout
        candidate = Path(out.strip())
        if (candidate / "initdb").exists():
            return candidate
    except (OSError, subprocess.CalledProcessError):
        pass
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    raise StackError("PostgreSQL server binaries (initdb) not found: install the `postgresql` package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """The OS user to run the server as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:  # pragma: no cover - depends on the machine
        raise StackError("running as root needs a `postgres` OS user to run initdb") from exc
    return "postgres"


@dataclass
class PgCluster:
    """One running throwaway cluster; `superuser`/`password` connect over TCP with scram."""

    base_dir: Path
    port: int
    superuser: str = "postgres"
    password: str = field(default_factory=lambda: "pw-" + secrets.token_hex(8))
    settings: Mapping[str, str] = field(default_factory=dict)
    bindir: Path = field(default_factory=pg_bindir)
    initdb_args: list[str] = field(default_factory=list)  # e.g. ["--wal-segsize=1"]

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def conninfo(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        user = user or self.superuser
        pw = self.password if password is None and user == self.superuser else (password or "")
        return psycopg.conninfo.make_conninfo(
            host=self.host, port=self.port, dbname=dbname, user=user, password=pw, connect_timeout=10
        )

    def connect(self, dbname: str = "postgres", autocommit: bool = True, **kw: Any) -> psycopg.Connection:
        return psycopg.connect(self.conninfo(dbname), autocommit=autocommit, **kw)

    def sql(
        self,
        query: str | psycopg.sql.SQL | psycopg.sql.Composed,
        dbname: str = "postgres",
        params: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> list[tuple]:
        """Run one statement as superuser and return its rows (empty when it returns none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _run(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        user = _server_user()
        cmd = (["runuser", "-u", user, "--"] if user else []) + args
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)

    def init(self) -> None:
        user = _server_user()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if user:
            shutil.chown(self.base_dir, user)
            shutil.chown(self.socket_dir, user)
            shutil.chown(pwfile, user)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "--pwfile",
                str(pwfile),
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                *self.initdb_args,
            ]
        )
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "max_connections": "60",
            "password_encryption": "'scram-sha-256'",
            **dict(self.settings.items()),
        }
        with (self.data_dir / "postgresql.auto.conf").open("a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def start(self) -> None:
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            with suppress(subprocess.CalledProcessError):
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        self.stop()
        self.start()

    def set(self, **settings: str) -> None:
        """Change settings with ALTER SYSTEM and reload (restart() for the ones that need it)."""
        with self.connect() as conn:
            for key, value in settings.items():
                conn.execute(f"ALTER SYSTEM SET {key} = {psycopg.sql.quote(value)}")
            conn.execute("SELECT pg_reload_conf()")

    def create_role(self, name: str, password: str, *extra: str) -> None:
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} " + " ".join(extra)).format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )

    def create_database(self, name: str, owner: str | None = None) -> None:
        from psycopg import sql

        with self.connect() as conn:
            q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if owner:
                q = q + sql.SQL(" OWNER {}").format(sql.Identifier(owner))
            conn.execute(q)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def pg_cluster(
    settings: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    initdb_args: list[str] | None = None,
) -> Iterator[PgCluster]:
    """Start a throwaway cluster and always tear it down (also when the test fails)."""
    tmp = Path(tempfile.mkdtemp(prefix="dbops-pg-")) if base_dir is None else base_dir
    if _server_user():
        os.chmod(tmp, 0o755)
    cluster = PgCluster(
        base_dir=tmp / "cluster",
        port=free_port(),
        settings=dict(settings or {}),
        initdb_args=list(initdb_args or []),
    )
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        if base_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> None:
    """Poll a real condition (not a sleep-as-synchronisation): fail loudly when it never holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def persistent_cluster(base_dir: Path, settings: Mapping[str, str] | None = None) -> PgCluster:
    """The `make run` sandbox: created once under the state folder, reused (same port and password) after.

    The password is kept in a 0600 file beside the cluster: it is a local sandbox, not production.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    meta = base_dir / "sandbox.env"
    if meta.exists():
        values = dict(line.split("=", 1) for line in meta.read_text().splitlines() if "=" in line)
        cluster = PgCluster(
            base_dir=base_dir / "cluster",
            port=int(values["port"]),
            password=values["password"],
            settings=dict(settings or {}),
        )
    else:
        cluster = PgCluster(base_dir=base_dir / "cluster", port=free_port(), settings=dict(settings or {}))
    if _server_user():
        os.chmod(base_dir, 0o755)
        for parent in base_dir.resolve().parents:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if not mode & 0o001:  # the postgres user must be able to traverse to its data directory
                os.chmod(parent, mode | 0o001)
    if not (cluster.data_dir / "PG_VERSION").exists():
        cluster.init()
        fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"port={cluster.port}\npassword={cluster.password}\n")
    if not is_running(cluster):
        cluster.start()
    return cluster


def is_running(cluster: PgCluster) -> bool:
    try:
        with psycopg.connect(cluster.conninfo(), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False
