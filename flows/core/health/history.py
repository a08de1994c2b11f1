"""The size history db_health keeps between runs: one point a day (the day's last size), the last 60 days,
as a small JSON object in a Prefect Variable per database identity (system identifier + name, like the
reindex baselines), so growth per day and the days until the disk is full rest on real figures.

Prefect caps a Variable's value at 5,000 characters; 60 daily points are about 1,700, so one value holds
them, and older points are dropped, never the newest.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date, timedelta

from pydantic import BaseModel, Field

HISTORY_DAYS = 60
SPARK_DAYS = 14
SPARKS = "▁▂▃▄▅▆▇█"
VARIABLE_VALUE_LIMIT = 4800
HISTORY_VERSION = 1


class SizeHistory(BaseModel):
    """Daily database sizes (bytes), keyed by UTC date YYYY-MM-DD."""

    version: int = HISTORY_VERSION
    days: dict[str, int] = Field(default_factory=dict, description="UTC date -> database bytes that day")
    free: dict[str, int] = Field(default_factory=dict, description="UTC date -> free bytes on the data disk")

    def record(self, today: date, database_bytes: int, free_bytes: int | None = None) -> SizeHistory:
        """The history with today's point (replacing an earlier one of today), older than 60 days dropped."""
        cutoff = (today - timedelta(days=HISTORY_DAYS - 1)).isoformat()
        days = {d: b for d, b in self.days.items() if d >= cutoff}
        days[today.isoformat()] = int(database_bytes)
        free = {d: b for d, b in self.free.items() if d >= cutoff}
        if free_bytes is not None:
            free[today.isoformat()] = int(free_bytes)
        return SizeHistory(days=dict(sorted(days.items())), free=dict(sorted(free.items())))

    def growth_per_day(self) -> float | None:
        """Bytes per day over the kept window (first to last point), None with fewer than two days."""
        points = sorted(self.days.items())
        if len(points) < 2:
            return None
        (d0, b0), (d1, b1) = points[0], points[-1]
        span = (date.fromisoformat(d1) - date.fromisoformat(d0)).days
        return (b1 - b0) / span if span > 0 else None

    def last_days(self, today: date, n: int = SPARK_DAYS) -> list[int | None]:
        """The last n days' sizes, oldest first, None where no run recorded one."""
        return [self.days.get((today - timedelta(days=n - 1 - i)).isoformat()) for i in range(n)]

    def to_value(self) -> str:
        value = json.dumps(self.model_dump(), separators=(",", ":"))
        while len(value) > VARIABLE_VALUE_LIMIT and len(self.days) > 1:  # never expected: 60 points fit
            oldest = min(self.days)
            self.days.pop(oldest)
            self.free.pop(oldest, None)
            value = json.dumps(self.model_dump(), separators=(",", ":"))
        return value

    @classmethod
    def from_value(cls, value: object) -> SizeHistory:
        """An unreadable or foreign value is an empty history (growth unknown), never a failed run."""
        try:
            raw = json.loads(value) if isinstance(value, str) else value
            if isinstance(raw, dict) and raw.get("version") == HISTORY_VERSION:
                return cls.model_validate(raw)
        except ValueError:
            pass
        return cls()


def sparkline(values: list[int | None]) -> str:
    """▁▂▃▄▅▆▇█ scaled between the smallest and largest value; a day without a point is a space."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif hi == lo:
            out.append(SPARKS[0])
        else:
            out.append(SPARKS[min(int((v - lo) / (hi - lo) * (len(SPARKS) - 1) + 0.5), len(SPARKS) - 1)])
    return "".join(out)


def history_variable_name(system_identifier: int, database: str) -> str:
    """`dbops_health_size_<system_identifier>_<database>`, kept readable and unique like the baselines'."""
    name = database.lower()
    if not re.fullmatch(r"[a-z0-9_-]+", name) or name != database:
        name = re.sub(r"[^a-z0-9_-]", "_", name) + "_" + hashlib.sha256(database.encode()).hexdigest()[:8]
    return f"dbops_health_size_{system_identifier}_{name}"[:255]
