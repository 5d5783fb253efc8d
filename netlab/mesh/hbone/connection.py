"""One HBONE connection: HTTP/2 over an asyncio TLS transport, and its CONNECT streams.

:class:`HboneConnection` binds h2's state machine to the transport; each CONNECT stream is an
:class:`HboneStream`, an :class:`~netlab.mesh.endpoint.Endpoint` a relay can splice to TCP.
Client (:mod:`.client`) and server (:mod:`.server`) differ only in who opens the streams.

HTTP/2 windows: 4 MiB stream and connection, max frame 1 MiB (``netlab.istio``).

Performance: asyncio Protocols end to end (no StreamReader), 1 MiB DATA frames, received DATA
chunks are handed to the other side without re-buffering (:meth:`HboneConnection._receive_fast`),
credit is returned as bytes leave, and DATA is sent without h2's serialization copies
(:meth:`HboneConnection._send_data_fast`).
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import logging
from collections.abc import Callable
from typing import Any, cast

import h2
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame

from netlab.istio import HBONE_ALPN, HBONE_MAX_FRAME, HBONE_WINDOW
from netlab.mesh.endpoint import WRITE_HIGH, WRITE_LOW, Endpoint, StreamReset
from netlab.mesh.hbone.tls import peer_uri_sans
from netlab.mesh.sockets import Address, set_linger_zero

log = logging.getLogger("netlab.mesh.hbone")

H2_DEFAULT_WINDOW = 65535
TLS_WRITE_HIGH = 2 * 1024 * 1024
TLS_WRITE_LOW = 512 * 1024
H2_PREAMBLE_LEN = 24  # the client's connection preface "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" (RFC 9113 §3.4)
# The zero-copy receive path calls H2Connection._receive_frame and the send path drives h2's
# state machines directly (private, stable across h2 4.x); anything else uses the public API.
_FAST_RX = h2.__version__.startswith("4.") and hasattr(h2.connection.H2Connection, "_receive_frame")
try:
    from h2.connection import ConnectionInputs as _ConnectionInputs
    from h2.stream import StreamInputs as _StreamInputs

    _FAST_TX = _FAST_RX
except ImportError:  # pragma: no cover - other h2 versions
    _FAST_TX = False

Headers = list[tuple[str, str]]
_REPR_HEAD = 11  # payload bytes a frame's repr shows: 22 hex digits, enough to decide on "..."


class _DataView(DataFrame):
    """A received DATA frame (or a piece of one) whose payload is a view of the bytes read.

    h2 builds ``repr(frame)`` for every frame it receives, to log it, whether or not the logger
    logs (``logger.trace("Received frame: %s", repr(frame))``); hyperframe's repr of a DATA
    frame re-serializes the whole body (a 1 MiB join) and hexlifies all of it, to keep 20 hex
    digits. Profiling the HBONE server showed that repr costing ~40 % of its CPU. This repr
    gives the same string from the first bytes only.
    """

    def _body_repr(self) -> str:
        head = binascii.hexlify(bytes(self.data[:_REPR_HEAD])).decode("ascii")
        if not head:
            return "None"
        return "<hex:" + (head[:20] + "..." if len(head) > 20 else head) + ">"


class _H2State(h2.connection.H2Connection):
    """h2's connection state machine, fed :class:`_DataView` frames on the zero-copy path.

    h2 picks a frame's handler by its exact class, so the view class gets DATA's handler.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._frame_dispatch_table[_DataView] = self._receive_data_frame


class HboneStream(Endpoint):
    """One CONNECT stream as a byte stream (see :class:`~netlab.mesh.endpoint.Endpoint`).

    Attributes: ``status`` (response status), ``peer_identity`` (URI SAN of the TLS peer),
    ``local_addr``/``peer_addr`` of the TCP connection underneath, ``stream_id``.
    """

    def __init__(self, conn: HboneConnection, stream_id: int) -> None:
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_bytes = 0
        self._end_pending = False
        self._unacked = 0  # flow-control credit held back while paused
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

    # ---- Endpoint hooks -----------------------------------------------------------------------
    def _t_write(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        if not mv.readonly:  # the caller may reuse a bytearray; we keep a view until it is sent
            mv = memoryview(bytes(mv))
        self._out.append(mv)
        self._out_bytes += len(mv)
        self._conn._flush_stream(self)
        if self._out_bytes > WRITE_HIGH and not self._write_blocked and self.reset_exc is None:
            self._on_write_blocked()

    def _t_write_eof(self) -> None:
        self._end_pending = True
        self._conn._flush_stream(self)

    def _t_abort(self) -> None:
        self._out.clear()
        self._out_bytes = 0
        self._conn._reset_stream(self, ErrorCodes.CONNECT_ERROR)

    def _t_close(self) -> None:
        self._conn._stream_closed(self)

    def _t_pause(self) -> None:
        pass  # credit is held back in _t_consumed

    def _t_resume(self) -> None:
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self._conn._ack(self, n)

    def _t_consumed(self, n: int) -> None:
        if self._pause_reasons:
            self._unacked += n
        else:
            self._conn._ack(self, n)

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


class HboneConnection(asyncio.Protocol):
    """h2 state machine bound to an asyncio TLS transport (one per TLS connection).

    ``check(conn)`` runs once the TLS handshake is done and may refuse the peer (a reason
    string): the connection is then reset before any HTTP/2 byte. On the server side
    ``on_request(conn, stream, headers)`` is called for every request received.
    """

    def __init__(
        self,
        client_side: bool,
        on_request: Callable[[HboneConnection, HboneStream, Headers], None] | None = None,
        check: Callable[[HboneConnection], str | None] | None = None,
    ) -> None:
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.h2 = _H2State(cfg) if _FAST_RX else h2.connection.H2Connection(config=cfg)
        self.client_side = client_side
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, HboneStream] = {}
        self._on_request = on_request
        self._check = check
        self._paused = False
        self.failed: str | None = None
        self.peer_identity: str | None = None
        self.peer_identities: list[str] = []
        self.local_addr: Address | None = None
        self.peer_addr: Address | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.preface: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # peer's SETTINGS seen
        self.lost = False  # the transport is gone (set before the streams hear of it)
        self.extra: dict[str, Any] = {}  # free slot for the owner (e.g. "known workload")
        self._preamble_left = 0 if client_side else H2_PREAMBLE_LEN
        self._rbuf = bytearray()
        self._data_left = 0
        self._data_sid = 0
        self._data_end = False

    # ---- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        sockname, peername = t.get_extra_info("sockname"), t.get_extra_info("peername")
        self.local_addr = (sockname[0], sockname[1]) if sockname else None
        self.peer_addr = (peername[0], peername[1]) if peername else None
        sslobj = transport.get_extra_info("ssl_object")
        self.peer_identities = peer_uri_sans(sslobj)
        self.peer_identity = self.peer_identities[0] if self.peer_identities else None
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        if alpn != HBONE_ALPN:
            self.failed = f"ALPN {alpn!r} negotiated, {HBONE_ALPN!r} required"
        elif self._check is not None:
            self.failed = self._check(self)
        if self.failed:
            log.info("hbone: dropping TLS connection from %s: %s", self.peer_addr, self.failed)
            set_linger_zero(t.get_extra_info("socket"))
            t.abort()
            return
        t.set_write_buffer_limits(high=TLS_WRITE_HIGH, low=TLS_WRITE_LOW)
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: HBONE_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: HBONE_MAX_FRAME,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            }
        )
        self.h2.increment_flow_control_window(HBONE_WINDOW - H2_DEFAULT_WINDOW)
        self._send()

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            if self._preamble_left:  # the client's connection preface: h2 checks it
                n = min(self._preamble_left, len(data))
                self._preamble_left -= n
                events = self.h2.receive_data(data[:n])
                if n < len(data):
                    events += self._receive(data[n:])
            else:
                events = self._receive(data)
        except h2.exceptions.ProtocolError as e:
            log.info("hbone: protocol error from %s: %s", self.peer_addr, e)
            try:
                self.h2.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
                self._send()
            except h2.exceptions.ProtocolError:
                pass
            self._terminate(StreamReset(f"HTTP/2 protocol error: {e}"))
            return
        for ev in events:
            self._dispatch(ev)
        self._send()

    def eof_received(self) -> bool | None:
        return None  # TLS: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._terminate(exc or StreamReset("HBONE connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.release()

    def release(self) -> None:
        """Let go of the TLS transport and the h2 state as soon as the connection is gone.

        Streams outlive their connection (a relay or a log line may still hold one, and each
        holds ``_conn``), and h2's ``H2Connection`` refers to itself through its frame dispatch
        table of bound methods, so without this a closed connection's TLS transport (uvloop's
        SSLProtocol has a 256 KiB read buffer, plus the OpenSSL SSL object and its BIOs) and
        the h2 state (streams, HPACK tables, ~350 objects) waited for a full cyclic GC pass,
        which a proxy with many long-lived objects runs rarely: RSS grew with every
        connection handled. Nothing uses either once ``lost`` is set.
        """
        self.transport = None
        self._on_request = None
        self._check = None
        self._rbuf = bytearray()
        table = getattr(self.h2, "_frame_dispatch_table", None)
        if isinstance(table, dict):
            table.clear()  # breaks H2Connection's self-reference (bound methods)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for s in list(self.streams.values()):
            self._flush_stream(s, send=False)
        self._send()

    def _receive(self, data: bytes) -> list[h2.events.Event]:
        return self._receive_fast(data) if _FAST_RX else self.h2.receive_data(data)

    def _receive_fast(self, data: bytes) -> list[h2.events.Event]:
        """Frame the input ourselves so DATA payloads reach h2 as zero-copy memoryview pieces.

        h2's FrameBuffer copies every payload three times (append, slice, ``tobytes``), which
        doubled the server's CPU per byte. Here a DATA frame's payload is handed to h2's frame
        handler piece by piece as it arrives (h2 accounts flow control per byte, so splitting a
        frame is invisible to it); every other frame, padded DATA, and DATA inside a header
        block (a protocol error h2 reports) is passed whole to ``receive_data`` so h2 still
        validates it. Used from the first byte after the client's preface on.
        """
        h = self.h2
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        events: list[h2.events.Event] = []
        rbuf = self._rbuf
        while pos < n:
            left = self._data_left
            if left:
                take = min(left, n - pos)
                self._data_left = left = left - take
                f = _DataView(self._data_sid, data=mv[pos : pos + take])  # type: ignore[arg-type]  # a view
                pos += take
                if not left and self._data_end:
                    f.flags.add("END_STREAM")
                events += h._receive_frame(f)
                continue
            if len(rbuf) < 9:
                take = min(9 - len(rbuf), n - pos)
                rbuf += mv[pos : pos + take]
                pos += take
                if len(rbuf) < 9:
                    break
            length = int.from_bytes(rbuf[0:3], "big")
            ftype, flags = rbuf[3], rbuf[4]
            if ftype == 0x0 and not flags & 0x8 and len(rbuf) == 9 and not h.incoming_buffer._headers_buffer:
                # DATA, not PADDED, not inside a header block
                if length > h.max_inbound_frame_size:
                    raise h2.exceptions.FrameTooLargeError(f"DATA frame of {length} bytes")
                sid = int.from_bytes(rbuf[5:9], "big") & 0x7FFFFFFF
                if sid == 0:
                    raise h2.exceptions.ProtocolError("DATA frame on stream 0")
                rbuf.clear()
                self._data_sid, self._data_end, self._data_left = sid, bool(flags & 0x1), length
                if length == 0:
                    f = _DataView(sid, data=b"")
                    if flags & 0x1:
                        f.flags.add("END_STREAM")
                    events += h._receive_frame(f)
                continue
            take = min(9 + length - len(rbuf), n - pos)
            rbuf += mv[pos : pos + take]
            pos += take
            if len(rbuf) < 9 + length:
                break
            frame = bytes(rbuf)
            rbuf.clear()
            events += h.receive_data(frame)
        return events

    # ---- events -------------------------------------------------------------------------------
    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            s = self.streams.get(ev.stream_id)
            pad = ev.flow_controlled_length - len(ev.data)
            if s is None or s.reset_exc is not None:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                return
            if pad:
                self.h2.acknowledge_received_data(pad, ev.stream_id)
            if ev.data:
                s._on_data(ev.data)
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id == 0:
                for s in list(self.streams.values()):
                    self._flush_stream(s, send=False)
            elif (s := self.streams.get(ev.stream_id)) is not None:
                self._flush_stream(s, send=False)
        elif isinstance(ev, h2.events.StreamEnded):
            if (s := self.streams.get(ev.stream_id)) is not None:
                s._on_eof()
        elif isinstance(ev, h2.events.StreamReset):
            if (s := self.streams.get(ev.stream_id)) is not None:
                s._on_reset(StreamReset(f"RST_STREAM {ev.error_code!r}"))
        elif isinstance(ev, h2.events.RequestReceived):
            s = HboneStream(self, ev.stream_id)
            self.streams[ev.stream_id] = s
            if self._on_request is not None:
                self._on_request(self, s, cast(Headers, list(ev.headers)))  # str: header_encoding
        elif isinstance(ev, h2.events.ResponseReceived):
            if (s := self.streams.get(ev.stream_id)) is not None and not s._response.done():
                s._response.set_result(cast(Headers, list(ev.headers)))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if not self.preface.done():
                self.preface.set_result(None)
            for s in list(self.streams.values()):
                self._flush_stream(s, send=False)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._terminate(StreamReset(f"GOAWAY {ev.error_code!r}"))
            if self.transport is not None:
                self._send()
                self.transport.close()

    # ---- sending ------------------------------------------------------------------------------
    def _send(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def _flush_stream(self, s: HboneStream, send: bool = True) -> None:
        if self.lost or s.reset_exc is not None:
            return
        h = self.h2
        sid = s.stream_id
        out = s._out
        try:
            while out and not self._paused:
                window = h.local_flow_control_window(sid)
                if window <= 0:
                    break
                n = min(window, h.max_outbound_frame_size)
                head = out[0]
                if len(head) <= n:
                    out.popleft()
                    chunk = head
                else:
                    chunk = head[:n]
                    out[0] = head[n:]
                if _FAST_TX:
                    self._send_data_fast(sid, chunk)
                else:
                    h.send_data(sid, chunk)
                    if send:
                        self._send()
                s._out_bytes -= len(chunk)
            if not out and s._end_pending:
                s._end_pending = False
                h.end_stream(sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            s._on_reset(StreamReset(f"stream unusable: {e}"))
            return
        if send:
            self._send()
        if s._write_blocked and s._out_bytes < WRITE_LOW:
            s._on_writable()

    def _send_data_fast(self, sid: int, chunk: memoryview) -> None:
        """h2's ``send_data`` bookkeeping without its serialization copies.

        h2 copies each payload four times on the way out (``tobytes``, body join, header
        concat, ``data_to_send``). We run the same state-machine inputs and window
        decrements, flush whatever control frames h2 queued first (ordering: HEADERS and
        WINDOW_UPDATEs precede this DATA), and hand header + payload view to the transport.
        The caller has checked the windows and the max frame size.
        """
        h = self.h2
        n = len(chunk)
        h.state_machine.process_input(_ConnectionInputs.SEND_DATA)
        st = h.streams[sid]
        st.state_machine.process_input(_StreamInputs.SEND_DATA)
        st.outbound_flow_control_window -= n
        h.outbound_flow_control_window -= n
        pending = h.data_to_send()
        hdr = n.to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big")  # DATA, no flags
        assert self.transport is not None
        if pending:
            self.transport.write(pending)
        self.transport.write(hdr)
        self.transport.write(chunk)

    def _ack(self, s: HboneStream, n: int) -> None:
        if self.lost or n <= 0:
            return
        try:
            self.h2.acknowledge_received_data(n, s.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._send()

    def _reset_stream(self, s: HboneStream, code: ErrorCodes) -> None:
        if self.lost:
            return
        try:
            self.h2.reset_stream(s.stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._send()

    def send_response(self, s: HboneStream, status: int) -> None:
        s.status = status
        if self.lost:
            return
        try:
            self.h2.send_headers(s.stream_id, [(":status", str(status))], end_stream=status != 200)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        if status != 200:
            s.eof_sent = True
        self._send()

    def _stream_closed(self, s: HboneStream) -> None:
        if not s.done.done():
            return
        self.streams.pop(s.stream_id, None)
        # ztunnel 1.18: one CONNECT per connection; the client hangs up when its stream is over.
        if self.client_side and not self.streams and self.transport is not None and not self.lost:
            self._send()
            self.transport.close()

    def _terminate(self, exc: BaseException) -> None:
        for s in list(self.streams.values()):
            s._on_closed(exc)
        self.streams.clear()

    def send_request(self, headers: Headers) -> HboneStream:
        """Open a stream with ``headers`` (HEADERS without END_STREAM: a CONNECT's body follows)."""
        sid = self.h2.get_next_available_stream_id()
        stream = HboneStream(self, sid)
        self.streams[sid] = stream
        self.h2.send_headers(sid, headers, end_stream=False)
        self._send()
        return stream

    def abort(self) -> None:
        """Drop the connection with a TCP RST, saying nothing more."""
        if self.transport is not None and not self.lost:
            set_linger_zero(self.transport.get_extra_info("socket"))
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            try:
                self.h2.close_connection()
                self._send()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()

