"""The HTTP server's connection handling: uvicorn's h11 protocol with a deadline for a request's headers.

uvicorn times out idle keep-alive connections but not a connection whose request line and headers never
complete (a slow-loris client sending a header line every few seconds, or a silent socket): each would hold
a descriptor forever. `header_timeout` seconds after a connection opens, or after the first byte of a next
request on it, the headers must be in, else the connection is closed. Body read deadlines are the app's
(`ServerState.body_timeout`): the ASGI app sees a request only once its headers are complete.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    header_timeout: float = 10.0  # set by `protocol_with_header_timeout`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:  # the next request on the connection
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are in (or the connection failed)
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %g s", self.header_timeout)
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[Any]:
    """The protocol class for uvicorn.Config(http=...), closing connections whose headers are `seconds` late."""
    return type("HeaderTimeoutH11", (HeaderTimeoutH11Protocol,), {"header_timeout": seconds})
