"""Health checks: one module per group of checks, each returning the same result type.

`Check` is that type (ARCHITECTURE.md: ok / warning / critical, the figure, the sentence, what to do), so
the WAL check, the drills, the PgBouncer check and db_health can share one artifact table and one rule
for a failed run: the first critical check's sentence.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Status = Literal["ok", "warning", "critical", "skipped"]
SEVERITY: dict[str, int] = {"skipped": 0, "ok": 0, "warning": 1, "critical": 2}


class Check(BaseModel):
    """The result of one check."""

    name: str = Field(description="Which check, and of what (e.g. `waiting clients imagemanager/app`).")
    status: Status = Field(description="ok, warning, critical, or skipped (could not apply here).")
    figure: str = Field(description="The numbers the status is about, as a person reads them.")
    message: str = Field(default="", description="What is wrong, where (empty when ok).")
    action: str = Field(default="", description="What to do about it (empty when ok).")

    @property
    def sentence(self) -> str:
        """What is wrong and what to do, in one sentence (the failed run's message)."""
        return f"{self.message}; {self.action}" if self.action else self.message

    def row(self) -> dict[str, str]:
        """A row of the artifact table."""
        return {
            "check": self.name,
            "status": self.status,
            "figure": self.figure,
            "what is wrong": self.message,
            "what to do": self.action,
        }


def judged(name: str, status: Status, figure: str, *, message: str, action: str = "") -> Check:
    """A judged check: what is wrong and what to do only when something is (an ok check says neither)."""
    if status == "ok":
        return Check(name=name, status="ok", figure=figure)
    return Check(name=name, status=status, figure=figure, message=message, action=action)


def worst(checks: list[Check]) -> Status:
    level = max((SEVERITY[c.status] for c in checks), default=0)
    return "critical" if level == 2 else "warning" if level == 1 else "ok"


def first_critical(checks: list[Check]) -> Check | None:
    return next((c for c in checks if c.status == "critical"), None)


__all__ = ["SEVERITY", "Check", "Status", "first_critical", "judged", "worst"]
