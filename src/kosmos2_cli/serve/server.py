"""Running the service: the host check, the listening socket, and uvicorn with a SIGTERM that drains.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the requests in flight; the app's
lifespan then drains the scheduler. After SIGTERM the process exits 0: a drained stop is a clean one.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
from collections.abc import Callable

import uvicorn


class ServeError(Exception):
    """The service cannot start as asked; the message says why on one line."""

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, token: str | None) -> None:
    """A server reachable from other machines must ask for a token."""
    if not is_loopback(host) and not token:
        raise ServeError(f"refusing to listen on {host} without a token: anyone who can reach it could use the "
                         "model", advice="token")


def listen(host: str, port: int) -> socket.socket:
    """The bound, listening socket (port 0: a free one), or ServeError saying why not."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ServeError(f"cannot listen on {host}: {err.strerror or err}") from err
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, except that SIGTERM ends the process with status 0 once drained (uvicorn re-raises it)."""

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM:
            self.should_exit = True
            return
        super().handle_exit(sig, frame)


def run(app, sock: socket.socket, *, log_level: str = "info", on_started: Callable[[], None] | None = None) -> None:
    """Serve `app` on `sock` until SIGTERM or Ctrl-C; the requests in flight are answered first."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None, lifespan="on",
                            access_log=log_level in ("debug", "info"))
    server = _Server(config)
    if on_started is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            if server.started:
                on_started()

        server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
