"""Where a point-in-time recovery works, checked before anything is downloaded: the data directory, the
port, the disk space, the OS user's path to it, and the work directory beside it (spool, restore script,
socket, server log). Split from recovery.py: these refusals need nothing from the archive.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from flows.core.base_layout import BaseBackupManifest
from flows.core.pitr.errors import RecoveryRefused
from flows.core.pitr.extract import check_data_directory, check_free_space, own

WORK_SUFFIX = ".dbops-pitr"
WORK_MARK = ".dbops-pitr-workdir"


def work_directory(data_directory: Path) -> Path:
    """Where the spool, the restore script, the socket and the server log go: beside the data directory
    (never inside it: it would become part of the recovered cluster)."""
    return data_directory.with_name(data_directory.name + WORK_SUFFIX)


def check_port_free(port: int) -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                if s.connect_ex((host, port)) == 0:
                    raise RecoveryRefused(
                        f"port {port} is in use on this worker; choose a free port for the recovered server"
                    )
        except OSError:
            continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise RecoveryRefused(f"port {port} is in use on this worker; choose a free port") from None


def check_reachable(data_directory: Path, user: str | None) -> None:
    """The server's OS user must be able to walk to its data directory (a 0700 root home is a dead end)."""
    if not user:
        return
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for parent in data_directory.parents:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise RecoveryRefused(
                f"the {user} OS user cannot reach {data_directory}: {parent} is not searchable by others; "
                f"choose a directory under one it can reach (or chmod o+x {parent})"
            )


def preflight(
    data_directory: Path, port: int, manifest: BaseBackupManifest | None = None, user: str | None = None
) -> None:
    """The refusals that need nothing downloaded: directory, port, disk space, work directory."""
    check_data_directory(data_directory)
    check_reachable(data_directory, user)
    check_port_free(port)
    work = work_directory(data_directory)
    if work.exists() and not (work / WORK_MARK).exists() and any(work.iterdir()):
        raise RecoveryRefused(f"{work} exists and is not dbops' work directory; move it away")
    if manifest is not None:
        check_free_space(data_directory, manifest.raw_bytes)


def prepare_work_directory(data_directory: Path, user: str | None) -> Path:
    work = work_directory(data_directory)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(mode=0o700, parents=True)
    (work / WORK_MARK).write_text("")
    (work / "sock").mkdir(mode=0o700)
    own(work, user)
    return work


def free_local_port() -> int:
    """A port nothing listens on now (the drill's scratch server takes it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
