"""Compression of the stored dump: zstd in-process over `pg_dump -Z0`, or pg_dump's own gzip, or none.

zstd runs in libzstd worker threads, outside the GIL, beside pg_dump: compression overlaps extraction,
which is why the pipeline gets close to the cost of `pg_dump -Z0` alone while storing about what
`pg_dump -Fc` (zlib level 6) would.

zstd levels are tuned for what pg_dump writes. Its uncompressed custom format puts a 5-byte length word
before every row, and the imagemanager rows are mostly random hex and short JSON: there, zstd's standard
levels 2-7 store more than `pg_dump -Fc`'s zlib 6, and level 8 is the first that stores less, at about
7x level 1's CPU. A minimum match of 6 bytes (a short match at a far offset costs more than the literals
on random hex) and a 16 K-entry hash table change that (bench/README.md, measured on 353 MiB of -Z0 output
against 98.3 MB for `pg_dump -Fc`):

    level  parameters                               size vs -Fc   CPU s per 100 MiB
    1      zstd level 1 (fast)                       104.0 %       0.21
    2      greedy, hash 14, search 4, min match 6     99.9 %       0.61
    3      lazy,   hash 14, search 1, min match 6     98.9 %       0.71   <- default
    4      lazy,   hash 14, search 2, min match 6     97.4 %       0.75
    5      lazy2,  hash 14, search 2, min match 6     95.2 %       0.87
    6-19   zstd's level with min match 6             (level 8: 94.7 %, 1.37)

The default, 3, is the cheapest setting that stores less than `pg_dump -Fc`; with zstd in its own thread
it still runs beside extraction. Level 1 is there for a CPU-starved host.

The stages that apply these settings to a stream are in `flows.core.streams`.
"""

from __future__ import annotations

from enum import StrEnum

import zstandard


class Compression(StrEnum):
    zstd = "zstd"
    gzip = "gzip"
    none = "none"


#: suffix of the stored object after `.dump`
SUFFIX = {Compression.zstd: ".zst", Compression.gzip: "", Compression.none: ""}
DEFAULT_LEVEL = {Compression.zstd: 3, Compression.gzip: 6, Compression.none: 0}
LEVEL_RANGE = {Compression.zstd: (1, 19), Compression.gzip: (0, 9), Compression.none: (0, 0)}


def pg_dump_level(compression: Compression, level: int) -> int:
    """The `-Z` pg_dump gets: its own zlib level for gzip, 0 when we compress (or don't) ourselves."""
    return level if compression is Compression.gzip else 0


#: levels 2-5: (strategy, search_log) with window 19, hash and chain 14, min match 6 (see above)
_TUNED = {
    2: (zstandard.STRATEGY_GREEDY, 4),
    3: (zstandard.STRATEGY_LAZY, 1),
    4: (zstandard.STRATEGY_LAZY, 2),
    5: (zstandard.STRATEGY_LAZY2, 2),
}


def zstd_parameters(level: int, threads: int = 1) -> zstandard.ZstdCompressionParameters:
    """The compression parameters behind a dbops zstd level (1-19)."""
    if level in _TUNED:
        strategy, search_log = _TUNED[level]
        return zstandard.ZstdCompressionParameters(
            strategy=strategy,
            window_log=19,
            hash_log=14,
            chain_log=14,
            search_log=search_log,
            min_match=6,
            target_length=0,
            threads=threads,
        )
    if level >= 6:
        return zstandard.ZstdCompressionParameters.from_level(level, min_match=6, threads=threads)
    return zstandard.ZstdCompressionParameters.from_level(level, threads=threads)
