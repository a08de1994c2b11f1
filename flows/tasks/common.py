"""What every dbops task shares: the task decorator with its retry policy (transient errors only), the
per-database lock, progress logging at a steady interval, artifact keys Prefect accepts, and the failure
report every flow publishes (artifact and final state carry the same one sentence)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, ParamSpec, TypeVar

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Completed, Failed
from prefect.tasks import exponential_backoff

from blocks.postgres import load_database
from flows.core.errors import ConfigurationError, DbopsError, is_transient
from flows.core.identity import limit_name
from flows.core.postgres import scrub
from flows.core.redact import redact_secrets


def _exception_of(state: Any) -> BaseException | None:
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # the result itself may be the raised error
        return exc
    return result if isinstance(result, BaseException) else None


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry network blips, throttling and lock timeouts; a wrong password fails on the first try."""
    exc = _exception_of(state)
    return exc is not None and is_transient(exc)


def retry_policy() -> dict[str, Any]:
    """Task options for retryable work. DBOPS_RETRY_BACKOFF scales the delays (tests set it low)."""
    factor = float(os.environ.get("DBOPS_RETRY_BACKOFF", "10"))
    retries = int(os.environ.get("DBOPS_TASK_RETRIES", "3"))
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=factor) if factor > 0 else 0,
        "retry_jitter_factor": 0.5 if factor > 0 else None,
        "retry_condition_fn": retry_if_transient,
    }


P = ParamSpec("P")
R = TypeVar("R")


def dbops_task(name: str, *, retry: bool = True, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """The decorator of every dbops task.

    No result cache: a task checks or changes the world (a server, a bucket) and must do so on every
    run; its arguments (blocks, connection parameters with a password) are neither hashable nor meant
    to be stored. `retry=True` adds `retry_policy()` (transient errors only), read when the task is
    defined, that is when its module is imported. `retry=False` is for work that must not run twice on
    its own (a migration step, the checks of a restored database). `options` go to Prefect's `task`.
    """
    policy = retry_policy() if retry else {}
    return task(name=name, cache_policy=NONE, **{**policy, **options})


def ensure_concurrency_limit(name: str) -> bool:
    """Create the one-slot limit if `dbops setup` has not: a missing limit must never mean "unguarded"."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                return False
            return True


#: How long the db:<name> slot outlives its holder when the holder dies without releasing it (a worker or
#: host lost: SIGKILL, OOM, power). The running job renews the lease every 3/4 of this; once renewals stop,
#: the server's repossessor frees the slot within this plus its loop period (15 s by default). 300 s is
#: Prefect's own default; the server accepts 60 s at least. DBOPS_LOCK_LEASE_SECONDS overrides it.
DEFAULT_LOCK_LEASE_SECONDS = 300.0


def lock_lease_seconds() -> float:
    raw = os.environ.get("DBOPS_LOCK_LEASE_SECONDS", "")
    try:
        value = float(raw) if raw else DEFAULT_LOCK_LEASE_SECONDS
    except ValueError:
        raise ConfigurationError(
            f"DBOPS_LOCK_LEASE_SECONDS={raw!r} is not a number of seconds; set it to e.g. 300 or unset it"
        ) from None
    if value < 60:  # the server refuses shorter leases (422)
        raise ConfigurationError(
            f"DBOPS_LOCK_LEASE_SECONDS={raw} is shorter than the 60 s the Prefect server accepts; "
            "use 60 or more"
        )
    return value


@contextmanager
def database_lock(
    database_block: str,
    wait_seconds: float = 3 * 3600,
    maintenance_database: str = "postgres",
) -> Iterator[None]:
    """Hold `db:<system identifier>:<database>` so dump, migrate, reindex and restore never overlap on one
    database, whichever block or spelling (localhost, an IP, an alias) names it.

    The target is identified first (connecting with the block; through `maintenance_database` when the
    database does not exist yet). A failed lease renewal (a short API outage) only logs: cancelling a
    running dump or migration half way would do more harm, and migrate and reindex keep their
    PostgreSQL advisory locks. Only a timeout while *acquiring* the slot means another job holds it.
    The slot is a lease (`lock_lease_seconds`): a holder that dies without releasing it (its worker or
    host lost) frees it when the lease runs out, so a crash never blocks the next night's jobs.
    """
    from flows.tasks.identity import identify_target  # flows.tasks.identity imports this module

    name = limit_name(identify_target(database_block, maintenance_database))
    logger = get_run_logger()
    if ensure_concurrency_limit(name):
        logger.warning("created the missing concurrency limit %s (run `dbops setup` to manage it)", name)
    logger.info("waiting for concurrency limit %s (%s)", name, database_block)
    with ExitStack() as held:
        try:
            held.enter_context(
                concurrency(
                    name,
                    occupy=1,
                    strict=True,
                    timeout_seconds=wait_seconds,
                    lease_duration=lock_lease_seconds(),
                    raise_on_lease_renewal_failure=False,
                )
            )
        except TimeoutError:
            raise ConfigurationError(
                f"another dbops job held {name} ({database_block}) for more than "
                f"{wait_seconds / 3600:.1f} h; check for a stuck run in the Prefect UI"
            ) from None
        logger.info("holding %s", name)
        since = time.monotonic()
        try:
            yield
        finally:
            # Logged while still held: the "holding" and "releasing" lines of one limit's runs never
            # interleave (tests/test_multiworker.py reads them back from the API).
            logger.info("releasing %s after %.1f s", name, time.monotonic() - since)


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    key = "-".join(parts).lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", key)).strip("-")


def failure_sentence(exc: BaseException) -> str:
    """The one sentence a failed run shows: a dbops error's own; anything else as `Type: first line`.

    An unexpected error may quote a connection string or a command with a password in it: both
    redactions run on every sentence, so the artifact and the state message never carry one.
    """
    if isinstance(exc, DbopsError):
        text = str(exc).strip()
    else:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return scrub(redact_secrets(text))


def database_name_of(block: str) -> str:
    """The database a PostgresDatabase block names (success artifacts are keyed by it), or the block's
    own name when the block cannot be read: a failure report must not fail on what it reports."""
    try:
        return load_database(block).params().database
    except Exception:
        return block.rsplit("/", 1)[-1]


def publish_failure(key: str, title: str, exc: BaseException, details: list[str] | None = None) -> Any:
    """Report a failed run where people look: the flow's artifact and its final state.

    The artifact uses the key of the flow's success artifact, so its latest version says why the last
    run failed; its first line is the sentence, then any partial details the flow had. The returned
    Failed state (the flow returns it) carries the same sentence as its message, without Prefect's
    "Flow run encountered an exception" prefix, and the exception as its data: `state.result()` and a
    direct call still raise the original error. The traceback goes to the log for unexpected errors.
    Typed `Any` like `failed_state`.
    """
    sentence = failure_sentence(exc)
    logger = get_run_logger()
    lines = [f"**Failed**: {sentence}", "", f"_{title}_"]
    lines += [f"- {scrub(redact_secrets(line))}" for line in details or []]
    try:
        create_markdown_artifact(key=key, markdown="\n".join(lines), description=f"Failed: {sentence}"[:500])
    except Exception as art_exc:  # the run's failure matters more than its report
        logger.warning("could not publish the failure artifact %s: %s", key, failure_sentence(art_exc))
    return failed_state(exc)


def judged_description(summary: str, failure: str | None) -> str:
    """A table artifact's description: on a judged failure the sentence comes first, so the artifacts
    list and the top of the table say why the run failed before anyone reads the rows."""
    if failure is None:
        return summary
    return f"**Failed**: {failure}\n\n{summary}"[:2000]


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A table artifact's rows as detail lines of a failure report (empty cells left out)."""
    return [" · ".join(f"{k}: {v}" for k, v in row.items() if v not in ("", None)) for row in rows]


def failed_state(exc: BaseException) -> Any:
    """The Failed state a flow returns for `exc`: the sentence as its message, the error as its data (a
    direct call and `state.result()` raise it), the traceback in the log for unexpected errors only.

    Typed `Any` on purpose: the flow returns this State in place of its report and Prefect makes it the
    run's outcome, so a caller gets the report or the error, never the State; the flow's declared return
    type (its report) stays what callers see, which Prefect's typing cannot say.
    """
    sentence = failure_sentence(exc)
    get_run_logger().error("%s", sentence, exc_info=None if isinstance(exc, DbopsError) else exc)
    return Failed(message=sentence, data=exc)


def completed_state(message: str, report: object) -> Any:
    """A Completed state whose message is the run's one line and whose data is its report; typed `Any`
    for the reason `failed_state` gives (a caller gets the report)."""
    return Completed(message=message, data=report)


class Progress:
    """Log progress every `interval` seconds, so a person watching the UI sees movement."""

    def __init__(self, what: str, interval: float = 10.0, total: int | None = None) -> None:
        self.what = what
        self.interval = interval
        self.total = total
        self.start = time.monotonic()
        self.last = self.start
        self.logger = get_run_logger()

    def __call__(self, done: int, stored: int | None = None) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6)
        msg = f"{self.what}: {human_bytes(done)} read, {human_bytes(rate)}/s"
        if stored is not None:
            msg += f", {human_bytes(stored)} stored"
        if self.total and rate > 0 and done < self.total:
            msg += f", about {int((self.total - done) / rate)} s left (estimate)"
        self.logger.info(msg)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
