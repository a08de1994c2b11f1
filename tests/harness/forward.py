"""A plain TCP forward (what Docker's `-p 15432:5432`, an SSH tunnel or HAProxy in TCP mode do): every
client connection gets its own upstream connection, bytes copied both ways, nothing pooled."""

from __future__ import annotations

import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _Server)
        upstream = socket.create_connection(server.upstream)
        client = self.request
        try:
            sockets = [client, upstream]
            while True:
                readable, _, _ = select.select(sockets, [], [], 1.0)
                if server.closing.is_set():
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every connection's thread
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _Pipe)
        self.upstream = upstream
        self.closing = threading.Event()


@contextmanager
def tcp_forward(host: str, port: int) -> Iterator[int]:
    """Listen on a free port of 127.0.0.1 and forward to host:port; yields the port."""
    server = _Server((host, port))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=False)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.closing.set()
        server.shutdown()
        thread.join()
        server.server_close()
