"""What one request, one client and one connection may cost ``metalab serve``, in one place.

Each limit has a default here and a flag on ``metalab serve`` (the README's reliability section lists
them). Per-item limits (one text, one image, one array) are in :mod:`metalab.serve.schemas`; these
bound the whole request, the client and the connection, and each is checked *before* the work it
bounds is done: a key before the body is read, a body's declared length before it arrives, an
image's size from its header before it is decoded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Limits:
    max_body: int = 16 * 1024 * 1024  #: bytes of one request body (413 above; --max-body)
    rate_limit: float = 200.0  #: requests/s per tenant, bursts of twice that (429; 0 = off; --rate-limit)
    auth_failures: float = 1.0  #: failed authentications/s per client address, on average (429 then; 0 = off)
    auth_burst: int = 30  #: failed authentications a client address may make in a row before that rate applies
    max_request_pixels: int = 50_000_000  #: image pixels one request may make the server decode (413)
    max_request_chars: int = 200_000  #: text characters one request may make the server encode (413)
    max_labels: int = 1000  #: labels of one adapter, declared or carried by its examples (422)
    header_timeout: float = 10.0  #: seconds a client has to send a request's headers (then it is disconnected)
    body_timeout: float = 60.0  #: seconds a client has to send a request's body once its headers are in
    keep_alive: float = 5.0  #: seconds an idle keep-alive connection stays open
    max_connections: int = 1000  #: open connections; one more is answered 503 and closed

    def __post_init__(self) -> None:
        from metalab.errors import ConfigError

        for f in fields(self):
            value = getattr(self, f.name)
            allowed_zero = f.name in ("rate_limit", "auth_failures")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allowed_zero):
                flag = "--" + f.name.replace("_", "-")
                raise ConfigError(f"{flag} must be a positive number{' (0 turns it off)' if allowed_zero else ''}; got {value!r}.")

    def with_(self, **changes) -> "Limits":
        """These limits with ``changes`` applied (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens/s on average, bursts up to ``burst``; rate 0 = off.

    Keys are tenants (requests) or client addresses (failed authentications). At most ``max_keys``
    buckets are kept; when that many exist, the full ones (nothing spent lately) are dropped."""

    def __init__(self, rate: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self.rate, self.burst = rate, burst or max(1.0, 2 * rate)
        self.max_keys = max_keys
        self._buckets: dict[object, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _tokens(self, key, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def wait_time(self, key, spend: bool = True) -> float:
        """0 if a token is there (spent when ``spend``), else the seconds until one will be."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens = self._tokens(key, now)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) / self.rate
            if spend:
                self._store(key, tokens - 1, now)
            return 0.0

    def spend(self, key) -> None:
        """Take a token, whether or not one is there (a failed authentication always counts)."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._store(key, self._tokens(key, now) - 1, now)

    def _store(self, key, tokens: float, now: float) -> None:
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
            for k in full or list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[k]
        self._buckets[key] = (tokens, now)
