"""The stream stages a backup's bytes pass through, side by side: hash and count, compress, decompress.

Each stage takes an iterable of chunks and yields chunks, so a pipeline is a composition of generators
and memory stays bounded by one chunk per stage (rohmu's `rohmufile.py` keeps its stages together the
same way). Which zstd parameters a dbops level means is `flows.core.compression`'s business (its tuning
table); here the stages only apply them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import zstandard

from flows.core.compression import Compression, zstd_parameters

#: what a decompression stage raises on bytes that are not a valid zstd stream (a corrupt object)
DecompressionError = zstandard.ZstdError


def hashing(chunks: Iterable[bytes], digest: hashlib._Hash, counter: list[int]) -> Iterator[bytes]:
    """Pass chunks through unchanged, feeding `digest` and adding their length to `counter[0]`.

    The counter is a one-element list so the caller can read the running total (progress, the size
    compared with a manifest) while the stream is still being consumed downstream.
    """
    for chunk in chunks:
        digest.update(chunk)
        counter[0] += len(chunk)
        yield chunk


def zstd_compress(chunks: Iterable[bytes], level: int = 3, threads: int = 1) -> Iterator[bytes]:
    """Compress a stream into one zstd frame; `threads` > 0 moves the work into libzstd threads."""
    cobj = zstandard.ZstdCompressor(compression_params=zstd_parameters(level, threads)).compressobj()
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


def compress_stream(
    compression: Compression, chunks: Iterable[bytes], level: int, threads: int = 1
) -> Iterable[bytes]:
    """What gets stored: zstd is applied here, pg_dump's own gzip (or none) passes through unchanged."""
    return zstd_compress(chunks, level, threads=threads) if compression is Compression.zstd else chunks


def decompress_stream(compression: Compression, chunks: Iterable[bytes]) -> Iterable[bytes]:
    """What pg_restore can read: zstd is undone here, pg_dump's own gzip is read by pg_restore itself."""
    return zstd_decompress(chunks) if compression is Compression.zstd else chunks
