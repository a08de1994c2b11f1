"""Reading SQL text without a parser: statements split by a splitter that knows quotes, dollar quotes
and comments; quoted or qualified names normalised; which column type changes are binary compatible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# -- splitting -----------------------------------------------------------------------------------------

_DOLLAR = re.compile(r"\$([A-Za-z_\x80-\uffff][\w\x80-\uffff]*)?\$")


@dataclass(frozen=True)
class Statement:
    text: str  # without comments, for people
    masked: str  # also without string and dollar-quoted contents, for the rules

    @property
    def short(self) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= 240 else flat[:237] + "..."


def split_statements(sql: str) -> list[Statement]:
    """Split on top-level semicolons; comments dropped, literals kept in `text` and emptied in `masked`."""
    out: list[Statement] = []
    text: list[str] = []
    masked: list[str] = []
    i, n = 0, len(sql)

    def flush() -> None:
        t, m = "".join(text).strip(), "".join(masked).strip()
        if t:
            out.append(Statement(t, m))
        text.clear()
        masked.clear()

    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            text.append(" ")
            masked.append(" ")
            continue
        if c == "/" and sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
            text.append(" ")
            masked.append(" ")
            continue
        if c in "'\"":
            escapes = c == "'" and i > 0 and sql[i - 1] in "eE" and (i < 2 or not _ident_char(sql[i - 2]))
            j = i + 1
            while j < n:
                if escapes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            j = min(j + 1, n)
            text.append(sql[i:j])
            masked.append(sql[i:j] if c == '"' else "''")
            i = j
            continue
        if c == "$" and (i == 0 or not _ident_char(sql[i - 1])):
            m = _DOLLAR.match(sql, i)
            if m:
                tag = m.group(0)
                end = sql.find(tag, m.end())
                j = n if end < 0 else end + len(tag)
                text.append(sql[i:j])
                masked.append(f"{tag} {tag}")
                i = j
                continue
        if c == ";":
            flush()
            i += 1
            continue
        text.append(c)
        masked.append(c)
        i += 1
    flush()
    return out


def _ident_char(c: str) -> bool:
    return c.isalnum() or c in "_$"


# -- names ---------------------------------------------------------------------------------------------

IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\uffff][\w$\x80-\uffff]*)'
NAME = rf"{IDENT}(?:\s*\.\s*{IDENT})*"


def norm_name(name: str) -> str:
    """`Public."Foo"` -> `public.Foo`: unquoted parts fold to lower case, like PostgreSQL does."""
    parts = re.findall(IDENT, name)
    return ".".join(p[1:-1].replace('""', '"') if p.startswith('"') else p.lower() for p in parts)


def bare_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside parentheses (the masked text has no literals left to trip on)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def flatten(text: str) -> str:
    return " ".join(text.split())


# -- type changes --------------------------------------------------------------------------------------


def norm_type(type_text: str) -> str:
    t = flatten(type_text).lower()
    t = re.sub(r"\bcharacter varying\b", "varchar", t)
    t = re.sub(r"\bbit varying\b", "varbit", t)
    t = re.sub(r"\bdecimal\b", "numeric", t)
    return re.sub(r"\s*([(),])\s*", r"\1", t)


def _type_args(t: str, base: str) -> list[int] | None:
    """[] for `base` without modifier, [n, ...] for `base(n, ...)`, None if another type."""
    m = re.fullmatch(rf"{base}(?:\((\d+)(?:,(\d+))?\))?", t)
    if not m:
        return None
    return [int(g) for g in m.groups() if g is not None]


def binary_compatible(old: str, new: str) -> bool:
    """Type changes PostgreSQL does without rewriting the table or rebuilding indexes."""
    old, new = norm_type(old), norm_type(new)
    if old == new:
        return True
    for base in ("varchar", "varbit"):
        a, b = _type_args(old, base), _type_args(new, base)
        if a is not None and b is not None:
            return not b or (bool(a) and b[0] >= a[0])
    if (_type_args(old, "varchar") is not None) and new == "text":
        return True
    if old == "text" and new == "varchar":
        return True
    if old == "cidr" and new == "inet":
        return True
    a, b = _type_args(old, "numeric"), _type_args(new, "numeric")
    if a is not None and b is not None:
        if not b:
            return True
        if not a:
            return False
        return b[0] >= a[0] and (a[1] if len(a) > 1 else 0) == (b[1] if len(b) > 1 else 0)
    return False


def widening_target(new: str) -> bool:
    """Targets that a binary-compatible change can have: without the old type we cannot decide."""
    new = norm_type(new)
    return new in ("text", "inet") or any(
        _type_args(new, base) is not None for base in ("varchar", "varbit", "numeric")
    )
