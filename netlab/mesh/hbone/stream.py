"""One CONNECT stream of an HBONE connection as a byte stream (an :class:`~netlab.mesh.endpoint.Endpoint`).

The stream keeps what is its own: the bytes waiting for flow-control credit (``_out``), the
windows of both directions, the credit held back while paused. Framing and TLS are its
connection's (:class:`netlab.mesh.hbone.connection.HboneConnection`).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

from netlab.istio import HBONE_WINDOW
from netlab.mesh.endpoint import Endpoint, StreamReset
from netlab.mesh.hbone.frames import CONNECT_ERROR, HEADER
from netlab.mesh.hbone.tls_protocol import RECORD
from netlab.mesh.sockets import Address

if TYPE_CHECKING:
    from netlab.mesh.hbone.connection import HboneConnection

Headers = list[tuple[str, str]]


class HboneStream(Endpoint):
    """One CONNECT stream as a byte stream (see :class:`~netlab.mesh.endpoint.Endpoint`).

    Attributes: ``status`` (response status), ``peer_identity`` (URI SAN of the TLS peer),
    ``local_addr``/``peer_addr`` of the TCP connection underneath, ``stream_id``.
    """

    def __init__(self, conn: HboneConnection, stream_id: int, send_window: int) -> None:
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self._out: collections.deque[memoryview] = collections.deque()  # waiting for credit
        self._out_bytes = 0
        self._end_pending = False
        self._send_window = send_window  # what the peer lets us send on this stream
        self._recv_window = HBONE_WINDOW  # what we let the peer send
        self._recv_unacked = 0  # consumed, credit not yet returned
        self._unacked = 0  # flow-control credit held back while paused
        self._sink_write: Callable[[bytes | memoryview], object] | None = None  # a TCP sink's transport write
        self.status: int | None = None
        self.response_headers: Headers = []
        self._response: asyncio.Future[Headers] = self._loop.create_future()

    @property
    def response(self) -> asyncio.Future[Headers]:
        """The response headers (a client's stream); fails if the stream ends before them."""
        return self._response

    def refused(self) -> None:
        """The response was not 200: it ended the stream (END_STREAM), nothing will flow."""
        self._finish()

    # identity / addresses of the connection
    @property
    def peer_identity(self) -> str | None:
        return self._conn.peer_identity

    @property
    def local_addr(self) -> Address | None:
        return self._conn.local_addr

    @property
    def peer_addr(self) -> Address | None:
        return self._conn.peer_addr

    def tcp_input(self, src: Endpoint) -> Callable[[bytes], None]:
        """What a TCP stream relayed into this one may call for every chunk it reads, in place
        of its ``_on_data`` (:func:`netlab.mesh.relay.relay` makes it the TCP protocol's
        ``data_received``): a small chunk that credit allows becomes one DATA frame, encrypted
        and sent at once, with the counts ``Endpoint._on_data`` and ``write`` would keep; any
        other chunk takes the general path. One Python call per request instead of eight.
        """
        conn = self._conn
        sid = self.stream_id
        pack = HEADER.pack

        def data_received(data: bytes) -> None:
            n = len(data)
            tls_write = conn._tls_write
            if (n < RECORD and n <= self._send_window and n <= conn._send_window and not self._out
                    and self.reset_exc is None and not self.eof_sent and not conn._paused and not conn._wbuf
                    and not conn._receiving and not conn._shut and tls_write is not None):
                src.bytes_received += n
                self.bytes_sent += n
                self._send_window -= n
                conn._send_window -= n
                tls_write(pack(n >> 8, n & 0xFF, 0, 0, sid) + data)  # one DATA frame, one record
                t = conn.transport
                if t is not None and not conn.lost:
                    t.write(conn._bio_out.read())
            else:
                src._on_data(data)

        return data_received

    def _attach(self, sink: Endpoint) -> int:
        """Relay mode: keep the sink's transport ``write`` if it offers one (a TCP stream), for
        :meth:`HboneConnection._on_record`'s per-record path."""
        moved = super()._attach(sink)
        self._sink_write = getattr(sink, "transport_write", None)
        return moved

    # ---- Endpoint hooks -----------------------------------------------------------------------
    def _t_write(self, data: bytes | bytearray | memoryview) -> None:
        self._conn._write(self, data)

    def _t_write_eof(self) -> None:
        self._end_pending = True
        self._conn._flush_stream(self)

    def _t_abort(self) -> None:
        self._out.clear()
        self._out_bytes = 0
        self._conn._reset_stream(self, CONNECT_ERROR)

    def _t_close(self) -> None:
        self._conn._stream_closed(self)

    def _t_pause(self) -> None:
        pass  # credit is held back in _t_consumed

    def _t_resume(self) -> None:
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self._conn._credit(self, n)

    def _t_consumed(self, n: int) -> None:
        if self._pause_reasons:
            self._unacked += n
        else:
            self._conn._credit(self, n)

    def _check_done(self) -> None:
        super()._check_done()
        if self.done.done():
            self._conn._stream_closed(self)

    def _finish(self) -> None:
        super()._finish()
        if not self._response.done():
            # a copy: the waiter raises it, and a raised exception stored on us would be a cycle
            self._response.set_exception(
                self._reset_error() if self.reset_exc is not None else StreamReset("stream closed before response"))
            self._response.exception()  # mark retrieved
        self._conn._stream_closed(self)
