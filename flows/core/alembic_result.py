"""What an Alembic run did, step by step: plain data that the runner fills and migration errors carry
(kept apart so flows.core.errors can name the type without importing the runner)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepResult:
    revision: str
    direction: str  # "upgrade" | "downgrade"
    seconds: float


@dataclass
class RunResult:
    start: list[str]
    target: str
    steps: list[StepResult] = field(default_factory=list)
    end: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)
