"""Redacting secrets from text a person will see: shell commands the server shows us (archive_command,
restore_command), and the errors of parsers that quote their input (libpq's conninfo parser, pydantic).

DBAs put credentials in archive_command more often than they should (`AWS_SECRET_ACCESS_KEY=... aws s3
cp %p ...`, `PGPASSWORD=... psql ...`, `wal-g --password=...`); the WAL check shows the command in its
report and artifact, where everyone with read access to Prefect would see them. Only the value goes:
the command stays recognisable, so a person can still tell which command runs.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

REDACTED = "********"

#: a key whose value is a secret: AWS_SECRET_ACCESS_KEY, PGPASSWORD, --password, api_token, passphrase...
SECRET_KEY = re.compile(r"secret|passw|pass(?:phrase)?\b|pass_|pwd|token|key|credential|auth", re.IGNORECASE)

#: `KEY=value` or `--opt=value` as a word of its own (after a start, blank, ; & | or an opening paren);
#: the value is a quoted string or runs to the next blank or shell operator
_ASSIGNMENT = re.compile(
    r"""(?P<key>(?:^|(?<=[\s;&|(]))-{0,2}[A-Za-z_][\w.-]*)=(?P<value>'[^']*'|"(?:[^"\\]|\\.)*"|(?:\\.|[^\s;&|)'"])+)"""
)
#: credentials in a URL: scheme://user:password@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^\s:/@]*:)(?P<value>[^\s@/]+)(?=@)")


def redact_secrets(command: str) -> str:
    """The command with the values of secret-looking `KEY=value` / `--opt=value` words and URL passwords
    replaced by ********; `%p`, `%f`, paths and other options are left as they are."""

    def assignment(m: re.Match[str]) -> str:
        key = m.group("key")
        return f"{key}={REDACTED}" if SECRET_KEY.search(key.lstrip("-")) else m.group(0)

    text = _ASSIGNMENT.sub(assignment, command)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)


#: `password=...` in a conninfo string or a command (libpq's, psql's and pg_dump's own messages)
_PASSWORD_ASSIGNMENT = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)


def redact_passwords(text: str) -> str:
    """Only the unmistakable passwords: `password=...` and URL credentials. Narrower than
    redact_secrets, so an error's own words (`KEY=VALUE`, `sslkey=...`) stay as written."""
    text = _PASSWORD_ASSIGNMENT.sub(lambda m: m.group(1) + REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)


def libpq_parse_problem(message: str) -> str:
    """What libpq found wrong with a conninfo/URL, without the excerpt it quotes (maybe the password).

    libpq writes `invalid percent-encoded token: "<token>"`, `missing "=" after "<text>" in connection
    info string`, `... in URI: "<the whole URI>"`, `invalid connection option "<name>"`: the text is kept
    up to the first quoted excerpt longer than one character (`"]"` and `"="` name syntax, not input).
    """
    line = message.strip().splitlines()[0] if message.strip() else ""
    kept = re.match(r'(?:[^"]|"[^"]")*', line)  # `*`: always matches, maybe empty
    head = kept.group(0) if kept else ""
    head = re.sub(r"(?:\s*(?::|\bafter\b|\bin\b))+\s*$", "", head).strip()
    return head or "libpq could not read it"


def validation_summary(exc: ValidationError) -> str:
    """pydantic's complaints as "field: what is wrong", never the value it got (its `input_value`)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(p) for p in error["loc"]) or "value"
        if where == "password":
            parts.append("password: not a valid password")  # never the reason text, in case it quotes
        else:
            parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
