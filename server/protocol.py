"""How uvicorn carries the service: its options, and an HTTP protocol that gives a request's headers a deadline.

uvicorn times out an idle keep-alive connection but not one that sends its request line and headers slowly (a
byte a second holds it for ever), nor one that connects and sends nothing. `HeaderDeadlineProtocol` gives each
request the keep-alive timeout to complete its headers, from the connection's start or the request's first
byte; past it the client gets 408 and the connection closes.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from server.settings import UVICORN_WS

if TYPE_CHECKING:
    from server.settings import Settings

try:  # uvicorn[standard] installs httptools, which uvicorn prefers; h11 otherwise
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpProtocol
except ImportError:  # pragma: no cover - depends on the installation
    from uvicorn.protocols.http.h11_impl import H11Protocol as _HttpProtocol  # type: ignore[assignment]

WS_TRANSPORT_FACTOR = 4
"""uvicorn's own WebSocket message limit, in multiples of `ws_max_message_bytes`: a message up to this size
reaches the app, which refuses it with an error message and close 1009; uvicorn closes larger ones itself
(1009, the reason in the close frame only) before buffering more."""


def _timeout_response() -> bytes:
    body = json.dumps(
        {
            "type": "urn:simvq-codec:problem:header-timeout",
            "title": "Request timeout",
            "status": 408,
            "detail": "the request line and headers did not arrive in time; send them at once",
        }
    ).encode()
    head = (
        f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


REQUEST_TIMEOUT = _timeout_response()


class HeaderDeadlineProtocol(_HttpProtocol):
    """uvicorn's HTTP protocol, with a deadline of `timeout_keep_alive` seconds on each request's headers."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None and self.cycle is not self._awaited_after:
            self._deadline.cancel()  # those headers came in time
            self._deadline = None
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first byte of the next request
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._awaited_after = self.cycle  # headers complete when the parser makes a new request cycle
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        transport = self.transport
        if self.cycle is not self._awaited_after or transport.is_closing() or transport.get_protocol() is not self:
            return  # the headers came (or the connection became a WebSocket's)
        transport.write(REQUEST_TIMEOUT)
        transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options of the service (`simvq-codec serve` and the tests' loopback server)."""
    return dict(
        http=HeaderDeadlineProtocol,
        ws=UVICORN_WS,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        ws_max_size=WS_TRANSPORT_FACTOR * settings.ws_max_message_bytes,
    )
