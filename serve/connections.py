"""How `cxr serve` times out connections: the uvicorn settings and the one deadline uvicorn lacks.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), answers bytes
that are not HTTP with 400 (h11), and caps a request head at `h11_max_incomplete_event_size` bytes. It sets no
deadline on a connection that never sends a request, or that sends its head a byte at a time: such
connections stayed open for good. `TimedH11Protocol` adds that deadline: a connection whose request head has
not fully arrived `head_timeout` seconds after it opened (or after its last response) is closed. A body that
is slow to arrive is the app's to time out (`read_limited`'s `timeout`: 408).

On SIGTERM uvicorn waits `timeout_graceful_shutdown` seconds for the requests in flight, then cancels them;
`AnswerWhenCancelled` gives such a request a 503 in one line of JSON (uvicorn's own answer is a plain-text 500).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 * 1024


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head (`timed_protocol` sets it)."""

    head_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()  # nothing to answer: no request arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection failed)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's head has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def timed_protocol(head_timeout: float) -> type[TimedH11Protocol]:
    """A `TimedH11Protocol` class whose request heads must arrive within `head_timeout` seconds."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"head_timeout": float(head_timeout)})


def uvicorn_settings(head_timeout: float, keep_alive: float, grace: float) -> dict[str, Any]:
    """The keyword arguments of `uvicorn.run` for these timeouts and the SIGTERM grace period."""
    return {
        "http": timed_protocol(head_timeout),
        "timeout_keep_alive": float(keep_alive),
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "timeout_graceful_shutdown": float(grace),
    }


class AnswerWhenCancelled:
    """ASGI middleware: a request cancelled before its response started (the server is shutting down and the
    grace period is over) is answered 503 `{"detail": "the server is shutting down"}`."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not started:
                body = json.dumps({"detail": "the server is shutting down; the request was cancelled"}).encode()
                headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            raise
