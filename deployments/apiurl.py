"""Which Prefect server the `dbops` command talks to, and saying so.

A second shell next to `make run` has no PREFECT_API_URL; without one, Prefect's client quietly starts a
temporary server of its own over an empty database, and every block then "does not exist". So:

1. PREFECT_API_URL (environment or Prefect profile) wins when set;
2. else the URL the local stack recorded in its state folder (`<state>/run/api-url`, see
   deployments/stackstate.py; $DBOPS_STATE_DIR or `.state`);
3. else nothing: one sentence saying how to get a server, exit 3 (the trigger's "unreachable").

The chosen server must answer its health check before the command runs; the line naming it goes to
stderr so `--json` output stays clean.
"""

from __future__ import annotations

import logging
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from deployments.stackstate import default_state, recorded_api_url
from deployments.trigger import EXIT_UNREACHABLE


def health_problem(url: str, timeout: float = 5.0) -> str | None:
    """None when `<url>/health` answers, else why not."""
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout).read()
        return None
    except OSError as exc:
        return str(getattr(exc, "reason", exc))


@contextmanager
def find_api(state: Path | None = None) -> Iterator[str | int]:
    """Yield the API URL in effect for the command (Prefect's settings point at it meanwhile), or the
    exit code when there is no server to talk to."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    state = state or default_state()
    configured = get_current_settings().api.url
    settings: AbstractContextManager[object]
    if configured:
        url, source, local = str(configured), "PREFECT_API_URL", False
        settings = nullcontext()
    else:
        recorded = recorded_api_url(state)
        if not recorded:
            print(
                f"dbops: no Prefect server to talk to: PREFECT_API_URL is not set and no local stack has run "
                f"in {state}; start one with `make run`, or export PREFECT_API_URL=http://HOST:4200/api",
                file=sys.stderr,
            )
            yield EXIT_UNREACHABLE
            return
        url, source, local = recorded, f"the local stack in {state}", True
        settings = temporary_settings(updates={PREFECT_API_URL: url})
    problem = health_problem(url)
    if problem is not None:
        fix = "start it with `make run`" if local else "start it, or fix PREFECT_API_URL"
        print(
            f"dbops: the Prefect server at {url} ({source}) does not answer ({problem}); {fix}",
            file=sys.stderr,
        )
        yield EXIT_UNREACHABLE
        return
    print(f"dbops: Prefect server {url} ({source})", file=sys.stderr)
    with settings:
        yield url


def quiet_prefect_at_exit() -> None:
    """Prefect's events worker warns "Still processing items" while it flushes at exit: routine, not a
    problem, and it would be the last line of every command. Only its errors are shown."""
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
