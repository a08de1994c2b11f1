"""Secrets stay where they belong: child processes get an allowlisted environment, a passfile left by a
killed run is removed by the next one (never one a live run uses), and archive_command's secrets are
redacted before anything shows it. Real processes are killed with SIGKILL; nothing is patched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows.core.childenv import child_environment
from flows.core.postgres import PASS_DIR_PREFIX, ConnParams, libpq_environment, pass_dir_prefix, passfile
from flows.core.redact import REDACTED, redact_secrets

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys
from flows.core.postgres import ConnParams, passfile
params = ConnParams(host="h", port=5432, database="d", user="u", password=sys.argv[1])
with passfile(params) as path:
    print(path, flush=True)
    sys.stdin.read()  # hold the passfile until told to finish (or killed)
"""


@contextmanager
def passfile_holder(password: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A real process that wrote a passfile and keeps using it: (process, passfile path)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, password],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc, Path(proc.stdout.readline().strip())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def params(password: str | None = "pw") -> ConnParams:
    return ConnParams(host="127.0.0.1", port=5432, database="d", user="u", password=password)


def test_passfile_of_a_sigkilled_run_is_removed_by_the_next_run_but_a_live_runs_is_kept() -> None:
    with (
        passfile_holder("killed-run-pw") as (killed, killed_file),
        passfile_holder("live-run-pw") as (
            live,
            live_file,
        ),
    ):
        assert killed_file.read_text().strip().endswith(":killed-run-pw")
        assert killed_file.parent.name.startswith(pass_dir_prefix(killed.pid))
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed_file.exists()  # SIGKILL runs no cleanup: the password is left on disk

        with libpq_environment(params()) as env:  # the next run, here any libpq tool's environment
            assert not killed_file.parent.exists(), "the killed run's passfile directory is still there"
            assert live_file.exists(), "the passfile of a running process was removed"
            assert Path(env["PGPASSFILE"]).exists()
        assert not Path(env["PGPASSFILE"]).parent.exists()

        assert live.stdin is not None
        live.stdin.close()  # the live run finishes normally and removes its own
        assert live.wait(timeout=30) == 0
        assert not live_file.parent.exists()


def test_passfile_directory_of_a_reused_pid_or_another_naming_is_judged_safely() -> None:
    """A directory named after our own pid but another start time belongs to a dead process whose pid we
    got again: stale. One without the pid in its name (older dbops), or made on another host sharing this
    temporary directory (whose pids mean nothing here), is left alone."""
    tmp = Path(tempfile.gettempdir())
    ours = pass_dir_prefix()
    reused = Path(tempfile.mkdtemp(prefix=ours[: ours.rindex("-", 0, -1)] + "-1-", dir=tmp))
    legacy = Path(tempfile.mkdtemp(prefix=f"{PASS_DIR_PREFIX}legacy", dir=tmp))
    elsewhere = Path(tempfile.mkdtemp(prefix=f"{PASS_DIR_PREFIX}00000000-999999999-1-", dir=tmp))
    try:
        with passfile(params()) as path:
            assert not reused.exists()
            assert legacy.exists()
            assert elsewhere.exists()
            assert Path(path).parent.exists()  # our own, started now: alive
    finally:
        for d in (reused, legacy, elsewhere):
            if d.exists():
                os.rmdir(d)


def test_child_environment_keeps_what_tools_need_and_drops_credentials() -> None:
    worker = {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "TMPDIR": "/tmp/w",
        "PGSSLROOTCERT": "/etc/root.crt",
        "PGSSLCERT": "/etc/client.crt",
        "PGSSLKEY": "/etc/client.key",
        "PGCLIENTENCODING": "UTF8",
        "KRB5CCNAME": "FILE:/tmp/krb",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SESSION_TOKEN": "t",
        "PREFECT_API_KEY": "k",
        "PREFECT_API_URL": "http://x",
        "DBOPS_SANDBOX_PASSWORD": "p",
        "GITHUB_TOKEN": "g",
        "PGPASSWORD": "p",
        "PGPASSFILE": "/home/w/.pgpass",
        "PGHOST": "other",
        "PGSERVICE": "other",
        "PGOPTIONS": "-c x=y",
    }
    env = child_environment({"PGHOST": "db1", "PGOPTIONS": "-c lock_timeout=1000"}, environ=worker)
    kept = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"]
    kept += ["PGCLIENTENCODING", "KRB5CCNAME"]
    assert env == {**{k: worker[k] for k in kept}, "PGHOST": "db1", "PGOPTIONS": "-c lock_timeout=1000"}


@pytest.mark.parametrize(
    ("command", "secret"),
    [
        ("AWS_SECRET_ACCESS_KEY=abcd1234 aws s3 cp %p s3://b/wal/%f", "abcd1234"),
        ("env AWS_ACCESS_KEY_ID=AKIAXX AWS_SECRET_ACCESS_KEY='ab cd' aws s3 cp %p s3://b/%f", "ab cd"),
        ('PGPASSWORD="p w\\"x" psql -c "select 1" && cp %p /a/%f', 'p w\\"x'),
        ("export AWS_SESSION_TOKEN=tok123; cp %p /a/%f", "tok123"),
        ("wal-g --password=hunter2 wal-push %p", "hunter2"),
        ("archiver --api-token=t0k3n --dir=/a %p", "t0k3n"),
        ("psql 'host=h password=pw99' -f %p", "pw99"),
        ("aws_secret_access_key=lower123 cp %p /a/%f", "lower123"),
        ("curl -T %p https://user:urlpw77@archive.example/%f", "urlpw77"),
        ("(MINIO_SECRET_KEY=mk1 mc cp %p m/b/%f)", "mk1"),
    ],
)
def test_secret_values_in_archive_command_are_redacted(command: str, secret: str) -> None:
    redacted = redact_secrets(command)
    assert secret not in redacted
    assert REDACTED in redacted
    assert "%p" in redacted


@pytest.mark.parametrize(
    "command",
    [
        "cp %p /var/lib/postgresql/wal_archive/%f",
        "test ! -f /a/%f && cp %p /a/%f",
        "pgbackrest --stanza=main archive-push %p",
        "gzip < %p > /a/%f.gz",
        "",
        "/bin/true",
    ],
)
def test_commands_without_secrets_are_left_as_they_are(command: str) -> None:
    assert redact_secrets(command) == command
