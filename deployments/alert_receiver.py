"""A local stand-in for Slack or a pager: an HTTP receiver on 127.0.0.1 that keeps and prints the alerts
Prefect's automations send it.

`make run NOTIFY=1` starts one inside the stack (each alert is printed to the console and stack.log), and
the alert tests start one per module, so delivery is checked through Prefect's real notification path:
automation -> `CustomWebhookNotificationBlock` -> HTTP POST -> here. Run it alone with
`python -m deployments.alert_receiver --port 8765` and point a webhook block at it.

The block posts JSON `{"subject": ..., "body": ...}` (see `webhook_block`); anything else that arrives is
kept as its raw text, so a misconfigured block shows up instead of vanishing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: the JSON the webhook block sends: Prefect fills in the rendered subject and body
WEBHOOK_JSON = {"subject": "{{subject}}", "body": "{{body}}"}


@dataclass(frozen=True)
class Alert:
    subject: str
    body: str
    received: float  # time.time() when it arrived

    def text(self) -> str:
        return f"{self.subject}\n{self.body}"


class AlertReceiver:
    """Collects POSTed alerts in arrival order; `on_alert` is called for each (printing, logging)."""

    def __init__(self, port: int = 0, on_alert: Callable[[Alert], None] | None = None) -> None:
        self.alerts: list[Alert] = []
        self._lock = threading.Lock()
        self._on_alert = on_alert
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
                receiver._keep(raw)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="alert-receiver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def start(self) -> AlertReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> AlertReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _keep(self, raw: str) -> None:
        try:
            data = json.loads(raw)
            alert = Alert(str(data.get("subject", "")), str(data.get("body", "")), time.time())
        except (ValueError, AttributeError):
            alert = Alert("(not a dbops webhook payload)", raw, time.time())
        with self._lock:
            self.alerts.append(alert)
        if self._on_alert is not None:
            self._on_alert(alert)

    def matching(self, needle: str) -> list[Alert]:
        with self._lock:
            return [a for a in self.alerts if needle in a.subject]

    def wait_for(self, needle: str, count: int = 1, timeout: float = 60) -> list[Alert]:
        """The alerts whose subject contains `needle`, once there are `count` of them; TimeoutError naming
        what did arrive otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.matching(needle)
            if len(found) >= count:
                return found
            time.sleep(0.2)  # polling the list the HTTP thread fills, not waiting for time to pass
        with self._lock:
            got = [a.subject for a in self.alerts]
        raise TimeoutError(
            f"{count} alert(s) with {needle!r} did not arrive within {timeout:.0f} s; got {got}"
        )


def webhook_block(url: str) -> Any:
    """Prefect's own webhook notification block, posting the JSON this receiver reads."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    return CustomWebhookNotificationBlock(name="dbops-alerts", url=url, json_data=dict(WEBHOOK_JSON))


def format_alert(alert: Alert) -> str:
    lines = alert.body.splitlines() or [""]
    return "\n".join([f"== alert: {alert.subject}", *(f"   {line}" for line in lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alert_receiver", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    with AlertReceiver(args.port, on_alert=lambda a: print(format_alert(a), flush=True)) as receiver:
        print(f"listening on {receiver.url}; point a custom-webhook block there (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
