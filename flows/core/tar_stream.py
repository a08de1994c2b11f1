"""A tar stream read as it passes: which members went by, and the few small ones kept whole (backup_label,
backup_manifest), without a temporary file or seeking."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from flows.core.base_backup_errors import BaseBackupFailed

TAR_BLOCK = 512
#: backup_label is a few hundred bytes; backup_manifest ~150 bytes per file of the cluster
MAX_CAPTURE = 256 * 1024 * 1024
WAITING_NOTICE = "waiting for required WAL segments to be archived"


# -- reading the tar stream as it passes -------------------------------------------------------------------


@dataclass
class TarScanner:
    """Follow a tar stream chunk by chunk: member names, the contents of the few members we keep, the end.

    Memory: one partial header plus the captured members (bounded by MAX_CAPTURE); data members are
    skipped by counting, never buffered.
    """

    capture: frozenset[str] = frozenset({"backup_label", "backup_manifest"})
    captured: dict[str, bytes] = field(default_factory=dict)
    members: int = 0
    has_pg_control: bool = False
    wal_files: list[str] = field(default_factory=list)
    ended: bool = False
    _header: bytearray = field(default_factory=bytearray)
    _remaining: int = 0  # data bytes (with padding) of the current member still to come
    _keep: bytearray | None = None
    _keep_size: int = 0
    _keep_name: str = ""
    _long_name: str | None = None
    _pax_path: str | None = None
    _meta: str = ""  # "L" (GNU long name) or "x" (pax header): the member's data describes the next one

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if self.ended:
                return  # zero padding after the end-of-archive blocks
            if self._remaining:
                take = min(self._remaining, len(view))
                if self._keep is not None and len(self._keep) < self._keep_size:
                    self._keep += view[: min(take, self._keep_size - len(self._keep))]
                self._remaining -= take
                view = view[take:]
                if not self._remaining:
                    self._member_done()
                continue
            need = TAR_BLOCK - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == TAR_BLOCK:
                header = bytes(self._header)
                self._header.clear()
                self._start_member(header)

    def _start_member(self, header: bytes) -> None:
        if header == b"\0" * TAR_BLOCK:
            self.ended = True
            return
        if not _checksum_ok(header):
            raise BaseBackupFailed("pg_basebackup's output is not a tar stream (bad header checksum)")
        name = header[0:100].split(b"\0", 1)[0].decode(errors="replace")
        prefix = (
            header[345:500].split(b"\0", 1)[0].decode(errors="replace") if header[257:262] == b"ustar" else ""
        )
        if prefix:
            name = f"{prefix}/{name}"
        size = _octal(header[124:136])
        kind = chr(header[156]) if header[156] else "0"
        if self._long_name is not None:
            name, self._long_name = self._long_name, None
        if self._pax_path is not None:
            name, self._pax_path = self._pax_path, None
        padded = (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
        self._meta = kind if kind in ("L", "x") else ""
        keep = self._meta or (kind in ("0", "\0") and name.lstrip("./") in self.capture and name.lstrip("./"))
        if keep:
            if size > MAX_CAPTURE:
                raise BaseBackupFailed(
                    f"{name} in pg_basebackup's output is {size} bytes, more than dbops reads"
                )
            self._keep, self._keep_size, self._keep_name = bytearray(), size, name.lstrip("./")
        else:
            self._keep = None
        if not self._meta:
            self.members += 1
            clean = name.lstrip("./")
            if clean == "global/pg_control":
                self.has_pg_control = True
            elif clean.startswith("pg_wal/") and kind in ("0", "\0") and "/" not in clean[7:]:
                self.wal_files.append(clean[7:])
        self._remaining = padded
        if not padded:
            self._member_done()

    def _member_done(self) -> None:
        data = bytes(self._keep) if self._keep is not None else None
        self._keep = None
        if data is None:
            return
        if self._meta == "L":
            self._long_name = data.split(b"\0", 1)[0].decode(errors="replace")
        elif self._meta == "x":
            for m in re.finditer(rb"\d+ path=([^\n]*)\n", data):
                self._pax_path = m.group(1).decode(errors="replace")
        else:
            self.captured[self._keep_name] = data
        self._meta = ""

    def tap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.feed(chunk)
            yield chunk


def _octal(field_: bytes) -> int:
    if field_[0] & 0x80:  # base-256 (GNU) for sizes beyond 8 GiB
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == computed
