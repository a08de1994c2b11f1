"""Compression of the stored dump: zstd in-process over `pg_dump -Z0`, or pg_dump's own gzip, or none.

zstd runs in libzstd worker threads, outside the GIL, beside pg_dump: compression overlaps extraction,
which is why the pipeline gets close to the cost of `pg_dump -Z0` alone while storing about what
`pg_dump -Fc` (zlib level 6) would.

The default zstd level is 1: on the imagemanager data (hex checksums, JSON metadata) level 1 is both
faster and smaller than level 3 (bench/README.md: 208.8 MB vs 221.2 MB and 1.8 vs 3.2 CPU seconds for
727 MiB of `pg_dump -Z0` output, against 200.8 MB for `pg_dump -Fc`). zstd over the -Z0 archive also
pays for the 5-byte length word pg_dump writes before every row when it does not compress; only
level 8 and up (several times the CPU) come out smaller than `pg_dump -Fc` on that data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import StrEnum

import zstandard


class Compression(StrEnum):
    zstd = "zstd"
    gzip = "gzip"
    none = "none"


#: suffix of the stored object after `.dump`
SUFFIX = {Compression.zstd: ".zst", Compression.gzip: "", Compression.none: ""}
DEFAULT_LEVEL = {Compression.zstd: 1, Compression.gzip: 6, Compression.none: 0}
LEVEL_RANGE = {Compression.zstd: (1, 19), Compression.gzip: (0, 9), Compression.none: (0, 0)}


def pg_dump_level(compression: Compression, level: int) -> int:
    """The `-Z` pg_dump gets: its own zlib level for gzip, 0 when we compress (or don't) ourselves."""
    return level if compression is Compression.gzip else 0


def zstd_compress(chunks: Iterable[bytes], level: int = 3, threads: int = 1) -> Iterator[bytes]:
    """Compress a stream into one zstd frame; `threads` > 0 moves the work into libzstd threads."""
    cobj = zstandard.ZstdCompressor(level=level, threads=threads).compressobj()
    for chunk in chunks:
        out = cobj.compress(chunk)
        if out:
            yield out
    tail = cobj.flush()
    if tail:
        yield tail


def zstd_decompress(chunks: Iterable[bytes]) -> Iterator[bytes]:
    dobj = zstandard.ZstdDecompressor().decompressobj()
    for chunk in chunks:
        out = dobj.decompress(chunk)
        if out:
            yield out


def decompress_stream(compression: Compression, chunks: Iterable[bytes]) -> Iterable[bytes]:
    """What pg_restore can read: zstd is undone here, pg_dump's own gzip is read by pg_restore itself."""
    return zstd_decompress(chunks) if compression is Compression.zstd else chunks
