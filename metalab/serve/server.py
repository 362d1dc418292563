"""Run the service with uvicorn on a socket bound here (so ``--port 0`` can print the real port)."""

from __future__ import annotations

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


def serve(run_dir: str | Path, db: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          rate_limit: float = 200.0, max_body: int | None = None, announce: Callable[[str], None] = print) -> None:
    """Load the run, open the registry, listen, and serve until interrupted (Ctrl-C / SIGTERM)."""
    require_extra("fastapi", "metalab serve")
    require_extra("uvicorn", "metalab serve")
    import uvicorn

    from metalab.serve import schemas
    from metalab.serve.app import create_app

    app = create_app(run_dir, db, device, rate_limit, max_body or schemas.MAX_BODY_BYTES)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    served = app.app.state.served
    announce(f"metalab serve: http://{bound_host}:{bound_port}/ — run {served.run_dir.name} "
             f"({served.config.train.algo}, {served.modality}), registry {db}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
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

        self.app, self.sock = app, bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
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
