"""A local WAL spool: the recovered server's restore_command copies from it, dbops fills it ahead.

The archive's credentials (S3 keys) stay in the flow's process: the server's restore_command is a tiny
script that only copies from a local directory, so neither the data directory nor `ps` shows a secret.

The protocol between the script (run by the server, one file at a time) and the fetcher (a thread here):
- the script writes the name it needs into `.want` and waits until `NAME` or `NAME.absent` appears (or
  the fetcher's heartbeat `.alive` goes stale), then copies `NAME` to `%p` through a temporary name and a
  rename (a partial target would be read as a corrupt segment), or exits 1 (PostgreSQL: "not archived");
- the fetcher keeps up to `ahead` segments after the one wanted in the spool, fetches anything asked for
  that is not there (history files), writes `.absent` when the archive has no such file, and removes
  segments older than the one wanted (already copied by the server), so disk stays bounded.
Files appear in the spool by rename only: the script never sees half a segment.
"""

from __future__ import annotations

import os
import pwd
import threading
from dataclasses import dataclass, field
from pathlib import Path

from flows.core.chain import TimelineView
from flows.core.wal import HISTORY_RE, WAL_FILE_RE, parse_wal_name, segment_name
from flows.core.wal_archive import WalArchive, decompress

SCRIPT = """#!/bin/sh
# dbops point-in-time recovery: restore_command. Copies one WAL file the dbops flow fetched into the
# spool; exits 1 when the archive has no such file. Holds no credentials: the flow reads the archive.
spool="$1"; name="$2"; dest="$3"; wait_s="$4"
case "$name" in */*|.*|"") exit 1;; esac
printf '%s\\n' "$name" > "$spool/.want.$$" && mv -f "$spool/.want.$$" "$spool/.want"
i=0
while [ ! -f "$spool/$name" ] && [ ! -f "$spool/$name.absent" ]; do
  if [ ! -f "$spool/.alive" ] || [ "$i" -ge "$((wait_s * 10))" ]; then
    echo "dbops-spool: $name not fetched (the dbops flow is gone or too slow)" >&2; exit 1
  fi
  sleep 0.1; i=$((i + 1))
done
if [ -f "$spool/$name.absent" ]; then echo "dbops-spool: $name is not in the archive" >&2; exit 1; fi
cp "$spool/$name" "$dest.dbops-partial" && mv -f "$dest.dbops-partial" "$dest" && exit 0
rm -f "$dest.dbops-partial"; exit 1
"""

#: how long the script waits for one file before giving up (the flow fetches on demand well within it)
SCRIPT_WAIT_SECONDS = 600


@dataclass
class SpoolStats:
    fetched: int = 0
    bytes_downloaded: int = 0
    absent: list[str] = field(default_factory=list)
    wanted: str | None = None


class WalSpool:
    """The spool directory, its script, and the fetcher thread (start/stop)."""

    def __init__(
        self,
        archive: WalArchive,
        scan: TimelineView,
        directory: Path,
        first_segno: int,
        *,
        ahead: int = 8,
        user: str | None = None,
        poll: float = 0.05,
    ) -> None:
        self.archive = archive
        self.scan = scan
        self.dir = directory
        self.first = first_segno
        self.ahead = max(1, ahead)
        self.poll = poll
        self.stats = SpoolStats()
        self.error: str | None = None
        self.missing: str | None = None  # a segment absent while the archive has later ones
        self._uid = self._gid = -1
        if user:
            pw = pwd.getpwnam(user)
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next = first_segno  # the next segment to prefetch

    @property
    def script(self) -> Path:
        return self.dir.parent / "restore_wal.sh"

    def restore_command(self) -> str:
        return f"{self.script} {self.dir} %f %p {SCRIPT_WAIT_SECONDS}"

    def _own(self, path: Path) -> None:
        if self._uid >= 0:
            os.chown(path, self._uid, self._gid)

    def prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._own(self.dir)
        self.script.write_text(SCRIPT)
        self.script.chmod(0o755)
        self._touch(".alive")
        for tli, key in sorted(self.scan.histories.items()):
            self._fetch_key(f"{tli:08X}.history", key)

    def _touch(self, name: str) -> None:
        path = self.dir / name
        path.write_text("")
        self._own(path)

    def _fetch_key(self, name: str, key: str) -> None:
        data = self.archive.store.get_bytes(key)
        self.stats.bytes_downloaded += len(data)
        try:
            data = decompress(key, data)
        except ValueError as exc:
            self.error = str(exc)
            self._touch(name + ".absent")
            return
        tmp = self.dir / f".{name}.part"
        tmp.write_bytes(data)
        self._own(tmp)
        os.replace(tmp, self.dir / name)
        self.stats.fetched += 1

    def _key_for(self, name: str) -> str | None:
        if WAL_FILE_RE.match(name) and len(name) == 24:
            pos = parse_wal_name(name, self.scan.segment_size)
            seg = self.scan.segments.get(pos.segno)
            if seg is not None and self.scan.lineage.responsible(pos.segno) == pos.tli:
                return seg.key
        return self.archive.find(name)

    def _provide(self, name: str) -> None:
        """Fetch `name`, or mark it absent (noting a gap when the archive holds later segments)."""
        if (self.dir / name).exists() or (self.dir / f"{name}.absent").exists():
            return
        key = self._key_for(name)
        if key is not None:
            self._fetch_key(name, key)
            return
        self._touch(name + ".absent")
        self.stats.absent.append(name)
        if len(name) == 24 and WAL_FILE_RE.match(name) and not HISTORY_RE.match(name):
            pos = parse_wal_name(name, self.scan.segment_size)
            last = self.scan.last
            held = pos.segno in self.scan.segments  # on another timeline: not a hole in the chain
            if self.missing is None and not held and last is not None and last > pos.segno >= self.first:
                self.missing = segment_name(
                    self.scan.lineage.responsible(pos.segno), pos.segno, self.scan.segment_size
                )

    def _wanted(self) -> str | None:
        try:
            return (self.dir / ".want").read_text().strip() or None
        except OSError:
            return None

    def step(self) -> None:
        """One round: answer what the server waits for, prefetch ahead, drop what it has consumed."""
        wanted = self._wanted()
        self.stats.wanted = wanted
        current = self.first
        if wanted:
            self._provide(wanted)
            if len(wanted) == 24 and WAL_FILE_RE.match(wanted):
                current = parse_wal_name(wanted, self.scan.segment_size).segno
        self._next = max(self._next, current)
        while self._next <= current + self.ahead and not self._stop.is_set():
            if (
                self._next not in self.scan.segments
                and self.scan.last is not None
                and self._next > self.scan.last
            ):
                break  # the end of what the archive held when listed; later files come on demand
            name = segment_name(self.scan.lineage.responsible(self._next), self._next, self.scan.segment_size)
            self._provide(name)
            self._next += 1
        for path in self.dir.iterdir():
            m = WAL_FILE_RE.match(path.name)
            if m and len(path.name) == 24:
                segno = parse_wal_name(path.name, self.scan.segment_size).segno
                if segno < current - 1:
                    path.unlink(missing_ok=True)
        self._touch(".alive")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # reported by the recovery; the script sees .alive vanish
                self.error = f"fetching WAL from {self.archive.url} failed: {exc}"
                (self.dir / ".alive").unlink(missing_ok=True)
                return
            self._stop.wait(self.poll)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wal-spool", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        (self.dir / ".alive").unlink(missing_ok=True)
