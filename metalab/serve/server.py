"""Run the service with uvicorn on a socket bound here (so ``--port 0`` can print the real port),
with connection limits uvicorn does not have: a deadline for a request's headers and one for its
body (slow clients are disconnected), and a cap on open connections."""

from __future__ import annotations

import json
import logging
import signal
import socket
from pathlib import Path
from typing import Callable

from metalab.errors import ConfigError, require_extra


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio then sets TCP_NODELAY on each accepted connection (it checks the
    # proto); with proto 0 responses written in two parts waited ~40 ms for the peer's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"Cannot listen on {host}:{port} ({exc.strerror}); pick another --port (0 = any free port).") from None
    sock.listen(2048)
    return sock


log = logging.getLogger("metalab.serve")


def guarded_protocol(limits):
    """uvicorn's h11 protocol class with ``limits``' header and body deadlines and connection cap.

    A connection gets ``header_timeout`` seconds from its first byte of a request (or from opening)
    to finish the request's headers, then ``body_timeout`` seconds for the body; a client that is
    slower is disconnected. Between requests uvicorn's keep-alive timeout applies. A connection
    beyond ``max_connections`` is answered 503 (``Connection: close``) and closed at once."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"error": {"status": 503, "code": "too_many_connections", "field": None,
                                 "message": f"The server has {limits.max_connections} open connections, its limit "
                                            "(metalab serve --max-connections); retry shortly."}}).encode()
    over_capacity = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"retry-after: 1\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class GuardedH11Protocol(H11Protocol):
        _deadline = None
        _phase = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(over_capacity)
                transport.close()
                return
            self._arm("headers", limits.header_timeout)

        def data_received(self, data: bytes) -> None:
            if self._phase is None and self.conn.their_state is h11.IDLE:  # a new request begins
                self._arm("headers", limits.header_timeout)
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()  # a pipelined request may have been read meanwhile

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _follow(self) -> None:
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", limits.body_timeout)
            elif state is h11.IDLE:
                if self._phase == "body":  # that request is over (answered early, its body drained)
                    self._disarm()
            else:
                self._disarm()  # the request is in (DONE), or the connection is ending

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._too_slow, phase, seconds)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self._phase = None

        def _too_slow(self, phase: str, seconds: float) -> None:
            self._deadline = self._phase = None
            if not self.transport.is_closing():
                log.info("closing a connection from %s: its request %s took over %g s", self.client, phase, seconds)
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, limits):
    """The uvicorn configuration metalab serves ``app`` with (quiet logs, the guarded protocol)."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                          http=guarded_protocol(limits), timeout_keep_alive=limits.keep_alive)


def serve(run_dir: str | Path, db: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          limits=None, announce: Callable[[str], None] = print) -> None:
    """Load the run, open the registry, listen, and serve until interrupted (Ctrl-C / SIGTERM).
    ``limits``: a :class:`~metalab.serve.limits.Limits` (default: its defaults)."""
    require_extra("fastapi", "metalab serve")
    require_extra("uvicorn", "metalab serve")
    import uvicorn

    from metalab.serve.app import create_app
    from metalab.serve.limits import Limits

    limits = limits or Limits()
    app = create_app(run_dir, db, device, limits=limits)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    served = app.app.state.served
    announce(f"metalab serve: http://{bound_host}:{bound_port}/ — run {served.run_dir.name} "
             f"({served.config.train.algo}, {served.modality}), registry {db}")
    config = uvicorn_config(app, limits)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handlers it
    # found: make those no-ops so a stopped server exits 0 (everything is committed by then)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    announce("metalab serve: stopped")


class BackgroundServer:
    """The service in a background thread of this process (notebooks, tests, benchmarks).

    >>> with BackgroundServer(create_app(run, db)) as server:
    ...     httpx.get(server.url + "/healthz")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        from metalab.serve.limits import Limits

        self.app, self.sock = app, bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        limits = getattr(app, "limits", None) or Limits()
        self.server = uvicorn.Server(uvicorn_config(app, limits))
        self._thread = None

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        import threading
        import time

        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The service did not start on {self.url} within {timeout:.0f} s.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
