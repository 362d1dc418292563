"""The service's outermost ASGI layer: nothing costly happens for a request that will be refused.

In order, for every HTTP request:

1. A ``Content-Length`` that is not a number is a 400, one over ``max_body`` a 413 — before the body
   is read. A chunked body is counted while it streams in and refused the moment it passes the limit.
2. On ``/v1``: a client address that failed authentication too often lately is answered 429 (no key
   is even looked up); the key is checked from the headers alone (a missing or unknown one is a 401
   and counts as a failure); the tenant's request rate is spent (429). The body has not been read.
3. The app runs, with the tenant in ``scope["state"]``.

An error answered before the client sent its whole body says ``Connection: close`` and closes the
connection when that body is large or of unknown length (reading 14 MB to keep a connection is the
cost being avoided); a small one is read and dropped by the server, and the connection stays usable.
An exception raised after a response was sent (Starlette re-raises after its 500 handler) is kept
from the server, which would otherwise drop the keep-alive connection without a word.
"""

from __future__ import annotations

import logging

import anyio

from metalab.errors import StorageError
from metalab.serve.limits import Limits, TokenBuckets

log = logging.getLogger("metalab.serve")
SMALL_BODY = 64 * 1024  #: bodies up to this size are drained after an early error, so the connection stays open


def json_error(status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"status": status, "code": code, "message": message, "field": field}},
                        status_code=status, headers=headers)


def api_key(headers: dict[bytes, bytes]) -> str | None:
    """The key of ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, if any."""
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


class RequestGuard:
    """ASGI middleware around the FastAPI app; see the module docstring. ``registry`` looks keys up."""

    def __init__(self, app, registry, limits: Limits) -> None:
        self.app, self.registry, self.limits = app, registry, limits
        self.tenant_rate = TokenBuckets(limits.rate_limit)
        self.auth_failures = TokenBuckets(limits.auth_failures, limits.auth_burst)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        body_pending = length not in (None, b"0") or b"transfer-encoding" in headers
        close = body_pending and (length is None or not length.isdigit() or int(length) > SMALL_BODY)
        refuse = _Refuser(scope, receive, send, close)
        if length is not None and not length.isdigit():
            return await refuse(400, "bad_request", "The Content-Length header is not a whole number of bytes.")
        if length is not None and int(length) > self.limits.max_body:  # never read what is refused for its size
            return await _Refuser(scope, receive, send, True)(413, "body_too_large", self._too_large())
        if scope["path"].startswith("/v1"):
            refused = await self._authenticate(scope, headers)
            if refused is not None:
                return await refuse(*refused)
        if length is None and body_pending:  # chunked: read it here, up to the limit, then hand it on
            body = await self._read_chunked(receive)
            if body is None:
                return await refuse(413, "body_too_large", self._too_large())
            receive = _replay(body, receive)
        await self._run(scope, receive, send)

    def _too_large(self) -> str:
        return (f"The request body is over the {self.limits.max_body}-byte limit (metalab serve --max-body); "
                "send fewer or smaller examples per request.")

    async def _authenticate(self, scope, headers) -> tuple | None:
        """``None`` when the request may go on (the tenant put in its scope), else the refusal's arguments."""
        address = (scope.get("client") or ("unknown",))[0]
        wait = self.auth_failures.wait_time(address, spend=False)
        if wait > 0:
            seconds = max(1, round(wait))
            return (429, "rate_limited", f"Too many failed authentications from {address}; retry in {seconds} s "
                                         "with a valid key.", None, {"Retry-After": str(seconds)})
        key = api_key(headers)
        if key is None:
            self.auth_failures.spend(address)
            return (401, "unauthorized", "No API key; send 'Authorization: Bearer <key>' (create one with "
                                         "`metalab keys create TENANT`).")
        try:
            tenant = await anyio.to_thread.run_sync(self.registry.tenant_for_key, key[:1000])
        except StorageError as exc:
            return (503, "storage_unavailable", str(exc), None, {"Retry-After": "30"})
        if tenant is None:
            self.auth_failures.spend(address)
            return (401, "unauthorized", "The API key is unknown or revoked; create one with `metalab keys create TENANT`.")
        wait = self.tenant_rate.wait_time(tenant.id)
        if wait > 0:
            return (429, "rate_limited", f"Rate limit of {self.limits.rate_limit:g} requests/s reached; retry in {wait:.2f} s.",
                    None, {"Retry-After": str(max(1, round(wait)))})
        scope.setdefault("state", {})["metalab_tenant"] = tenant
        return None

    async def _read_chunked(self, receive) -> bytes | None:
        """The whole body of unknown length, or ``None`` once it passes ``max_body`` (or the client left)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _run(self, scope, receive, send) -> None:
        sent = {"started": False, "complete": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                sent["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if sent["complete"]:  # the app's handler answered (500 or other) and re-raised: the connection stays
                return
            if sent["started"]:  # half a response: only closing can end it
                raise
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            await json_error(500, "internal", "Internal error; nothing was changed. The server log has the details.")(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` (already read) once, then the connection's own messages
    (``http.disconnect`` when the client leaves)."""
    given = False

    async def replay():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _Refuser:
    """Sends one JSON error, with ``Connection: close`` when the unread body is not worth reading."""

    def __init__(self, scope, receive, send, close: bool) -> None:
        self.scope, self.receive, self.send, self.close = scope, receive, send, close

    async def __call__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.close:
            headers["Connection"] = "close"
        await json_error(status, code, message, field, headers)(self.scope, self.receive, self.send)
