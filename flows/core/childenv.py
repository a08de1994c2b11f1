"""The environment a child process (pg_dump, pg_restore, psql, pg_dumpall, pg_amcheck, ...) gets.

A worker's environment holds credentials for everything it talks to: AWS keys for the backup bucket,
the Prefect API key, dbops settings, tokens of other tools. A PostgreSQL client tool needs none of them,
and whatever it gets can leak into a core file, /proc/<pid>/environ of a long-running pg_dump, or a
shell that an archive or restore command starts. So children get an allowlist, not the worker's
environment minus a few names: what the tool needs to run (PATH, locale, home, temp dir) and the libpq
settings a DBA sets on the worker that change how the connection is secured (PGSSL*, Kerberos/GSSAPI),
never where or as whom it connects (the block decides that) and never a password.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

#: names passed through as they are
KEEP_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        # a libpq or OpenSSL installed outside the default library path
        "LD_LIBRARY_PATH",
        "OPENSSL_CONF",
        # how libpq secures the connection: the DBA's settings on the worker apply to dbops' tools too
        "PGSSLROOTCERT",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGSSLCRL",
        "PGSSLCRLDIR",
        "PGSSLSNI",
        "PGSSLCERTMODE",
        "PGSSLCOMPRESSION",
        "PGSSLMINPROTOCOLVERSION",
        "PGSSLMAXPROTOCOLVERSION",
        "PGREQUIREPEER",
        "PGREQUIREAUTH",
        "PGCHANNELBINDING",
        "PGGSSENCMODE",
        "PGGSSLIB",
        "PGGSSDELEGATION",
        "PGKRBSRVNAME",
        # how the session talks, not where to
        "PGTZ",
        "PGCLIENTENCODING",
        "PGDATESTYLE",
        "KRB5_CONFIG",
        "KRB5CCNAME",
        "KRB5_KTNAME",
        "KRB5_CLIENT_KTNAME",
    }
)
#: name patterns passed through: the locale categories
KEEP_PATTERNS = (re.compile(r"LC_[A-Z]+"),)


def kept(name: str) -> bool:
    """Whether a worker variable may reach a child process."""
    return name in KEEP_NAMES or any(p.fullmatch(name) for p in KEEP_PATTERNS)


def child_environment(
    extra: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The allowlisted part of the worker's environment, plus `extra` (which wins).

    Dropped, among everything else: AWS_*, PREFECT_*, DBOPS_*, tokens and secrets of other tools, and
    every PG* variable that would choose the server, database, user or password (PGHOST, PGSERVICE,
    PGPASSWORD, PGPASSFILE, PGOPTIONS, ...): the caller sets those from the block in `extra`.
    """
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if kept(k)}
    env.update(extra or {})
    return env
