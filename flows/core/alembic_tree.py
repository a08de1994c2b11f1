"""An application's Alembic revision tree as plain data: which revisions to apply or undo, in what order.

No subprocess and no database here: the tree comes from the driver's `scripts` answer
(`RevisionTree.from_answer`), and everything else is arithmetic on it. Only linear trees and trees whose
branches are merged again are supported: several heads are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.core.alembic_errors import (
    BrokenRevisionTree,
    MultipleHeads,
    NoDowngrade,
    TargetAheadOfCurrent,
    TargetBehindCurrent,
    UnknownRevision,
    UnknownTarget,
)


@dataclass(frozen=True)
class Revision:
    id: str
    down_revisions: tuple[str, ...]
    has_downgrade: bool
    doc: str
    path: str = ""

    @property
    def down_revision(self) -> str | None:
        """The single parent (None for a root); merges have several, see `down_revisions`."""
        return self.down_revisions[0] if len(self.down_revisions) == 1 else None


@dataclass(frozen=True)
class RevisionTree:
    """The revisions (newest first, Alembic's walk order) and heads of the tree in folder `where`."""

    where: Path
    revisions: tuple[Revision, ...]
    heads: tuple[str, ...]

    @classmethod
    def from_answer(cls, where: Path, answer: Mapping[str, Any]) -> RevisionTree:
        """The tree from the driver's `scripts` answer; a broken tree raises BrokenRevisionTree."""
        if "broken" in answer:
            reason = answer["broken"].strip().rstrip(".")
            raise BrokenRevisionTree(
                f"the Alembic tree at {where} is broken ({reason}); fix or remove that "
                "revision file in the application before migrating"
            )
        revisions = tuple(
            Revision(r["id"], tuple(r["down"]), bool(r["has_downgrade"]), r["doc"], r["path"])
            for r in answer["revisions"]
        )
        return cls(where, revisions, tuple(answer["heads"]))

    def by_id(self) -> dict[str, Revision]:
        return {r.id: r for r in self.revisions}

    def head(self) -> str:
        heads = list(self.heads)
        if len(heads) != 1:
            raise MultipleHeads(
                f"the Alembic tree at {self.where} has {len(heads)} heads ({', '.join(heads)}); "
                "merge them in the application (alembic merge heads) before migrating"
            )
        return heads[0]

    def ancestors(self, revs: list[str]) -> set[str]:
        """The revisions and everything below them."""
        by_id = self.by_id()
        seen: set[str] = set()
        stack = list(revs)
        while stack:
            rev = stack.pop()
            if rev in seen:
                continue
            seen.add(rev)
            stack.extend(by_id[rev].down_revisions)
        return seen

    def resolve(self, target: str) -> str | None:
        """A revision id, or None for base; 'head' needs a single head."""
        if target == "base":
            return None
        if target in ("head", "heads"):
            return self.head()
        by_id = self.by_id()
        if target in by_id:
            return target
        matches = [r for r in by_id if r.startswith(target)]
        if len(matches) == 1:
            return matches[0]
        raise UnknownTarget(
            f"target revision {target!r} is not in the Alembic tree at {self.where}; use one of "
            f"its revision ids, 'head' or 'base'"
        )

    def check_known(self, current: list[str], database: str = "the database") -> None:
        unknown = [r for r in current if r not in self.by_id()]
        if unknown:
            raise UnknownRevision(
                f"{database} is stamped with revision {', '.join(unknown)} which the Alembic tree at "
                f"{self.where} does not know; deploy the application version that contains it "
                "or check the schema and re-stamp the database by hand"
            )

    def pending(self, current: list[str], target: str = "head") -> list[str]:
        """Revisions to apply, oldest first, to bring `current` to `target`."""
        self.head()  # refuses trees with several heads
        self.check_known(current)
        goal = self.resolve(target)
        if goal is None:
            if current:
                raise TargetBehindCurrent(
                    f"target 'base' is behind the current revision {', '.join(current)}; use downgrade to go "
                    "back, upgrade only moves forward"
                )
            return []
        done = self.ancestors(current)
        if goal in done:
            if goal in current:
                return []
            raise TargetBehindCurrent(
                f"target revision {goal} is behind the current revision {', '.join(current)}; use downgrade "
                "to go back, upgrade only moves forward"
            )
        return self.topological(self.ancestors([goal]) - done)

    def topological(self, todo: set[str]) -> list[str]:
        """`todo` ordered so that every revision comes after its parents."""
        by_id = self.by_id()
        order: list[str] = []
        placed: set[str] = set()

        def visit(rev: str) -> None:
            if rev in placed or rev not in todo:
                return
            for down in by_id[rev].down_revisions:
                visit(down)
            placed.add(rev)
            order.append(rev)

        for rev in sorted(todo):
            visit(rev)
        return order

    def downgrade_steps(
        self, start: list[str], target: str, *, allow_empty_downgrade: bool = False
    ) -> list[tuple[str, str]]:
        """(Alembic downgrade target, revision undone) pairs, newest first, from `start` down to `target`."""
        self.head()
        goal = self.resolve(target)
        done = self.ancestors(start)
        keep = self.ancestors([goal]) if goal else set()
        if goal is not None and goal not in done:
            raise TargetAheadOfCurrent(
                f"target revision {goal} is not below the current revision {', '.join(start) or 'base'}; use "
                "upgrade to go forward, downgrade only moves back"
            )
        undo = list(reversed(self.topological(done - keep)))
        by_id = self.by_id()
        empty = [r for r in undo if not by_id[r].has_downgrade]
        if empty and not allow_empty_downgrade:
            raise NoDowngrade(
                f"revision {', '.join(empty)} has no downgrade (empty or raising downgrade()); restore "
                "from a backup instead, or downgrade by hand"
            )
        steps = []
        for rev in undo:
            downs = by_id[rev].down_revisions
            steps.append(("base" if not downs else (downs[0] if len(downs) == 1 else f"{rev}-1"), rev))
        return steps

    def offline_pairs(self, todo: list[str]) -> list[str]:
        """'FROM TO' for each revision of `todo`, as the driver's `offline` command takes them."""
        by_id = self.by_id()
        pairs = []
        for rev in todo:
            downs = by_id[rev].down_revisions
            frm = "base" if not downs else downs[0]
            if len(downs) > 1:  # a merge: render from all its parents
                frm = ",".join(downs)
            pairs.append(f"{frm} {rev}")
        return pairs
