"""One HBONE connection: HTTP/2 over hand-driven TLS, and its CONNECT streams.

:class:`HboneConnection` is a :class:`~netlab.mesh.hbone.tls_protocol.TlsProtocol` (TLS on a
plain TCP transport) that speaks HTTP/2 on it in two parts:

* the frames a tunnel lives on, DATA, WINDOW_UPDATE, PING, RST_STREAM and GOAWAY, are read by
  :class:`~netlab.mesh.hbone.frames.FrameReader` and handled here, with flow control kept here:
  DATA payloads go to their stream as memoryview pieces of the decrypted record, and DATA is
  written as a 9-byte header plus the caller's bytes, encrypted together (no frame objects,
  no copies beyond the small ones);
* the connection preface, SETTINGS and HEADERS/CONTINUATION (HPACK) go to the h2 library,
  which also keeps every stream's state: an END_STREAM that arrives on DATA is passed to it as
  an empty DATA frame, a RST_STREAM after we acted on it, and streams end and reset through it.

Each CONNECT stream is an :class:`~netlab.mesh.hbone.stream.HboneStream`. Client
(:mod:`.client`) and server (:mod:`.server`) differ only in who opens the streams.

HTTP/2 windows: 4 MiB stream and connection, max frame 1 MiB (``netlab.istio``); credit goes
back when half a window was consumed (as h2 did), and is held back while a stream is paused
(back-pressure: the peer stops at the window).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from netlab.istio import HBONE_ALPN, HBONE_MAX_FRAME, HBONE_WINDOW
from netlab.mesh.endpoint import WRITE_HIGH, WRITE_LOW, StreamReset
from netlab.mesh.hbone import frames
from netlab.mesh.hbone.frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    FLOW_CONTROL_ERROR,
    MAX_WINDOW,
    PROTOCOL_ERROR,
    STREAM_CLOSED,
    FrameError,
    FrameReader,
    StreamFrameError,
)
from netlab.mesh.hbone.stream import HboneStream, Headers
from netlab.mesh.hbone.tls import peer_uri_sans
from netlab.mesh.hbone.tls_protocol import TLS_WRITE_HIGH, TLS_WRITE_LOW, TlsProtocol

__all__ = ["TLS_WRITE_HIGH", "TLS_WRITE_LOW", "HboneConnection", "HboneStream", "Headers"]

log = logging.getLogger("netlab.mesh.hbone")

#: Consumed bytes after which credit goes back (h2's WindowManager: half the window).
CREDIT_AT = HBONE_WINDOW // 2
_unpack_header = frames.HEADER.unpack_from
_END_OR_PADDED = frames.FLAG_END_STREAM | frames.FLAG_PADDED
_SETTINGS = h2.settings.SettingCodes


def _code_name(code: int) -> str:
    try:
        return repr(ErrorCodes(code))
    except ValueError:
        return f"0x{code:x}"


class HboneConnection(TlsProtocol):
    """HTTP/2 over one TLS connection (see the module docstring).

    ``context`` is the TLS context of this side (:func:`~netlab.mesh.hbone.tls.client_context`
    or ``server_context``). ``check(conn)`` runs once the TLS handshake is done and may refuse
    the peer (a reason string): the connection is then reset before any HTTP/2 byte. On the
    server side ``on_request(conn, stream, headers)`` is called for every request received.
    """

    def __init__(
        self,
        client_side: bool,
        on_request: Callable[[HboneConnection, HboneStream, Headers], None] | None = None,
        check: Callable[[HboneConnection], str | None] | None = None,
        *,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(context, server_side=not client_side)
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.client_side = client_side
        self.streams: dict[int, HboneStream] = {}
        self._on_request = on_request
        self._check = check
        self.failed: str | None = None
        self.peer_identity: str | None = None
        self.peer_identities: list[str] = []
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.preface: asyncio.Future[None] = loop.create_future()  # peer's SETTINGS seen
        self.extra: dict[str, Any] = {}  # free slot for the owner (e.g. "known workload")
        self._preface_left = 0 if client_side else len(frames.PREFACE)
        self._reader: FrameReader | None = None
        self._send_window = DEFAULT_WINDOW  # connection credit the peer gave us
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._recv_window = HBONE_WINDOW  # what the peer may still send on the connection
        self._recv_unacked = 0

    # ---- TLS hooks ----------------------------------------------------------------------------
    def _tls_established(self) -> None:
        tls = self._tls
        assert tls is not None
        self.peer_identities = peer_uri_sans(tls)
        self.peer_identity = self.peer_identities[0] if self.peer_identities else None
        alpn = tls.selected_alpn_protocol()
        if alpn != HBONE_ALPN:
            self.failed = f"ALPN {alpn!r} negotiated, {HBONE_ALPN!r} required"
        elif self._check is not None:
            self.failed = self._check(self)
        if self.failed:
            log.info("hbone: dropping TLS connection from %s: %s", self.peer_addr, self.failed)
            self.abort()
            return
        self._reader = FrameReader(self, HBONE_MAX_FRAME)
        if not self._preface_left:
            self._plaintext = self._on_record
        self.h2.initiate_connection()
        self.h2.update_settings({
            _SETTINGS.INITIAL_WINDOW_SIZE: HBONE_WINDOW,
            _SETTINGS.MAX_FRAME_SIZE: HBONE_MAX_FRAME,
            _SETTINGS.MAX_CONCURRENT_STREAMS: 100,
        })
        self._send(self.h2.data_to_send())
        self._send(frames.window_update(0, HBONE_WINDOW - DEFAULT_WINDOW))
        self._kick()

    def _tls_plaintext(self, chunk: bytes) -> None:
        """The server's first bytes: the client's connection preface (h2 checks it), then frames."""
        reader = self._reader
        if reader is None or self.failed:
            return
        if self._preface_left:
            n = min(self._preface_left, len(chunk))
            self._preface_left -= n
            self._h2_feed(chunk[:n])
            chunk = chunk[n:]
        if not self._preface_left:
            self._plaintext = self._on_record  # from now on: frames
        if chunk:
            reader.feed(chunk)

    def _on_record(self, chunk: bytes) -> None:
        """One decrypted TLS record: to the frame reader, but for the tunnel's usual record.

        That record is one whole DATA frame (no padding, no END_STREAM) of a stream relayed to
        TCP, arriving between frames: its payload goes to the TCP transport from here, with
        what ``FrameReader.feed``, :meth:`on_data`, ``Endpoint._on_data``, ``Endpoint.write``
        would do written out (flow control, counts), then ``_t_consumed`` (credit), so that a
        request costs one Python call on this side instead of six. Anything else (and any
        stream or sink in an unusual state) takes the general path.
        """
        reader = self._reader
        if reader is None:
            return
        n = len(chunk) - frames.HEADER_LEN
        if n > 0 and not reader._left and not reader._head and reader._body is None and not reader._header_block:
            hi, lo, ftype, flags, sid = _unpack_header(chunk)
            s = self.streams.get(sid & 0x7FFFFFFF)
            if (s is not None and ftype == frames.DATA and not flags & _END_OR_PADDED and (hi << 8 | lo) == n
                    and s.reset_exc is None and not s.eof_received and n <= s._recv_window and n <= self._recv_window):
                w, sink = s._sink_write, s._sink
                if w is not None and sink is not None and sink.reset_exc is None and not sink.eof_sent:
                    self._recv_window -= n
                    s._recv_window -= n
                    s.bytes_received += n
                    sink.bytes_sent += n
                    w(chunk[frames.HEADER_LEN:] if n < 4096 else memoryview(chunk)[frames.HEADER_LEN:])
                    s._t_consumed(n)  # credit (held back while paused)
                    return
        reader.feed(chunk)

    def _plaintext_failed(self, e: Exception) -> None:
        if isinstance(e, FrameError):
            self._connection_error(e.code, str(e))
        elif isinstance(e, h2.exceptions.ProtocolError):
            self._connection_error(None, str(e))  # h2 has queued its GOAWAY
        else:
            log.error("hbone: connection from %s failed", self.peer_addr, exc_info=e)
            self._connection_error(frames.INTERNAL_ERROR, repr(e))

    def _tls_writable(self) -> None:
        for s in list(self.streams.values()):
            if s._out or s._end_pending:
                self._flush_stream(s, kick=False)
        self._kick()

    def _tls_failed(self, e: BaseException) -> None:
        self._terminate(StreamReset(f"TLS error: {e}"))
        super()._tls_failed(e)

    def _tls_lost(self, exc: Exception | None) -> None:
        self._terminate(exc or StreamReset("HBONE connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.release()

    def release(self) -> None:
        """Let go of the transport, TLS and h2 state as soon as the connection is gone.

        Streams outlive their connection (a relay or a log line may still hold one, and each
        holds ``_conn``), and h2's ``H2Connection`` refers to itself through its frame dispatch
        table of bound methods, as the frame reader refers to us: without this, a closed
        connection's TLS state (the OpenSSL object and its BIOs) and the h2 state (streams,
        HPACK tables, ~350 objects) waited for a full cyclic GC pass, which a proxy with many
        long-lived objects runs rarely: RSS grew with every connection handled.
        """
        super().release()
        self._on_request = None
        self._check = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        table = getattr(self.h2, "_frame_dispatch_table", None)
        if isinstance(table, dict):
            table.clear()  # breaks H2Connection's self-reference (bound methods)

    # ---- frames from the reader ---------------------------------------------------------------
    def on_data(self, sid: int, data: memoryview, end_stream: bool) -> None:
        """A piece of DATA (FrameReader): flow control, then to the stream.

        A relayed stream's bytes go to its sink here, with the bookkeeping of
        ``Endpoint._on_data`` written out: this runs for every record.
        """
        n = len(data)
        s = self.streams.get(sid)
        if n:
            self._recv_window -= n
            if self._recv_window < 0:
                raise FrameError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        if s is None or s.reset_exc is not None or s.eof_received:
            self._stray_data(s, sid, n)
            return
        if n:
            s._recv_window -= n
            if s._recv_window < 0:
                self._stream_error(s, FLOW_CONTROL_ERROR, "DATA beyond the stream window")
                self._credit(None, n)
                return
            sink = s._sink
            if sink is None:
                s._on_data(data)  # pull mode: buffered until read
            else:
                s.bytes_received += n
                sink.write(data)
                s._t_consumed(n)  # credit (held back while paused)
        if end_stream:
            self._h2_feed(frames.data_header(0, sid, True))  # h2's stream state: half-closed (remote)
            s._on_eof()

    def _stray_data(self, s: HboneStream | None, sid: int, n: int) -> None:
        """DATA for a stream that cannot take it: dropped, its connection credit returned."""
        if n:
            self._credit(None, n)
        if s is None:
            if self._idle(sid):
                raise FrameError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
        elif s.reset_exc is None:  # after END_STREAM
            self._stream_error(s, STREAM_CLOSED, "DATA after END_STREAM")

    def on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        """Any frame but unpadded DATA (FrameReader)."""
        try:
            if ftype == frames.WINDOW_UPDATE:
                self._window_update(sid, frames.parse_window_update(payload, sid))
            elif ftype == frames.PING:
                opaque = frames.parse_ping(payload, sid)
                if not flags & frames.FLAG_ACK:
                    self._send(frames.ping(opaque, ack=True))
            elif ftype == frames.RST_STREAM:
                self._rst_received(sid, frames.parse_rst_stream(payload, sid), payload)
            elif ftype == frames.GOAWAY:
                self._goaway_received(frames.parse_goaway(payload, sid)[1])
            elif ftype == frames.DATA:  # padded
                data = frames.unpad(payload, flags)
                pad = len(payload) - len(data)
                self._recv_window -= pad
                if (ps := self.streams.get(sid)) is not None:
                    ps._recv_window -= pad
                self._credit(None, pad)  # padding is consumed at once
                self.on_data(sid, data, bool(flags & frames.FLAG_END_STREAM))
            else:
                self._h2_feed(frames.frame_header(len(payload), ftype, flags, sid) + payload)
        except StreamFrameError as e:
            if (s := self.streams.get(e.stream_id)) is not None:
                self._stream_error(s, e.code, str(e))

    def _window_update(self, sid: int, inc: int) -> None:
        if sid == 0:
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                raise FrameError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            for each in list(self.streams.values()):
                if each._out:
                    self._flush_stream(each, kick=False)
            return
        s = self.streams.get(sid)
        if s is None:
            if self._idle(sid):
                raise FrameError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # a stream that is over: allowed, ignored
        s._send_window += inc
        if s._send_window > MAX_WINDOW:
            self._stream_error(s, FLOW_CONTROL_ERROR, "stream window above 2^31-1")
        elif s._out or s._end_pending:
            self._flush_stream(s, kick=False)

    def _rst_received(self, sid: int, code: int, payload: bytes) -> None:
        if (s := self.streams.get(sid)) is not None:
            s._out.clear()
            s._out_bytes = 0
            s._on_reset(StreamReset(f"RST_STREAM {_code_name(code)}"))
        # h2 closes the stream too (and calls a RST_STREAM on an idle stream a protocol error)
        self._h2_feed(frames.frame_header(4, frames.RST_STREAM, 0, sid) + payload)

    def _goaway_received(self, code: int) -> None:
        self._terminate(StreamReset(f"GOAWAY {_code_name(code)}"))
        self.close_tls()

    def _idle(self, sid: int) -> bool:
        """Stream ``sid`` was never opened (RFC 9113 §5.1: frames on it are a protocol error)."""
        by_peer = (sid & 1) == (0 if self.client_side else 1)
        highest = self.h2.highest_inbound_stream_id if by_peer else self.h2.highest_outbound_stream_id
        return sid > highest

    # ---- h2: preface, SETTINGS, HEADERS -------------------------------------------------------
    def _h2_feed(self, data: bytes) -> None:
        events = self.h2.receive_data(data)
        out = self.h2.data_to_send()
        if out:
            self._send(out)
        for ev in events:
            self._dispatch(ev)

    def _dispatch(self, ev: h2.events.Event) -> None:
        s: HboneStream | None
        if isinstance(ev, h2.events.RequestReceived):
            s = HboneStream(self, ev.stream_id, self._peer_initial_window)
            self.streams[ev.stream_id] = s
            if self._on_request is not None:
                self._on_request(self, s, cast(Headers, list(ev.headers)))  # str: header_encoding
        elif isinstance(ev, h2.events.ResponseReceived):
            if (s := self.streams.get(ev.stream_id)) is not None and not s._response.done():
                s._response.set_result(cast(Headers, list(ev.headers)))
        elif isinstance(ev, h2.events.StreamEnded):
            if (s := self.streams.get(ev.stream_id)) is not None:
                s._on_eof()
        elif isinstance(ev, h2.events.StreamReset):
            if (s := self.streams.get(ev.stream_id)) is not None:
                s._on_reset(StreamReset(f"RST_STREAM {ev.error_code!r}"))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._settings_changed(ev)
            if not self.preface.done():
                self.preface.set_result(None)

    def _settings_changed(self, ev: h2.events.RemoteSettingsChanged) -> None:
        changed = ev.changed_settings
        if (c := changed.get(_SETTINGS.MAX_FRAME_SIZE)) is not None:
            self._peer_max_frame = c.new_value
        if (c := changed.get(_SETTINGS.INITIAL_WINDOW_SIZE)) is not None:
            delta = c.new_value - self._peer_initial_window  # applies to open streams (RFC 9113 §6.9.2)
            self._peer_initial_window = c.new_value
            for s in self.streams.values():
                s._send_window += delta
                if s._send_window > MAX_WINDOW:
                    raise FrameError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window")
        for s in list(self.streams.values()):
            if s._out:
                self._flush_stream(s, kick=False)

    def _connection_error(self, code: int | None, reason: str) -> None:
        """GOAWAY (h2 sent it already for its own errors), reset every stream, close."""
        log.info("hbone: protocol error from %s: %s", self.peer_addr, reason)
        if code is not None:
            try:
                self.h2.close_connection(error_code=code)
            except h2.exceptions.ProtocolError:
                pass
        self._send(self.h2.data_to_send())
        self._terminate(StreamReset(f"HTTP/2 protocol error: {reason}"))
        if self._reader is not None:
            self._reader.close()  # nothing more is read
        self.close_tls()

    # ---- sending ------------------------------------------------------------------------------
    def _write(self, s: HboneStream, data: bytes | bytearray | memoryview) -> None:
        """A stream's bytes: one DATA frame now if credit and frame size allow, else queued."""
        n = len(data)
        if (not s._out and not self._paused and n <= s._send_window and n <= self._send_window
                and n <= self._peer_max_frame and not self.lost):
            s._send_window -= n
            self._send_window -= n
            self._send_payload(frames.data_header(n, s.stream_id), data)
            self._kick()
            return
        mv = memoryview(data)
        if not mv.readonly:  # the caller may reuse a bytearray; we keep a view until it is sent
            mv = memoryview(bytes(mv))
        s._out.append(mv)
        s._out_bytes += n
        self._flush_stream(s)
        if s._out_bytes > WRITE_HIGH and not s._write_blocked and s.reset_exc is None:
            s._on_write_blocked()

    def _flush_stream(self, s: HboneStream, kick: bool = True) -> None:
        """Send what credit allows of a stream's queue (then its END_STREAM, if asked for)."""
        if self.lost or s.reset_exc is not None:
            return
        out = s._out
        sid = s.stream_id
        while out and not self._paused:
            n = min(s._send_window, self._send_window, self._peer_max_frame)
            if n <= 0:
                break
            head = out[0]
            if len(head) <= n:
                out.popleft()
                chunk = head
            else:
                chunk = head[:n]
                out[0] = head[n:]
            n = len(chunk)
            s._send_window -= n
            self._send_window -= n
            s._out_bytes -= n
            self._send_payload(frames.data_header(n, sid), chunk)
        if not out and s._end_pending:
            s._end_pending = False
            try:
                self.h2.end_stream(sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                s._on_reset(StreamReset(f"stream unusable: {e}"))
                return
            self._send(self.h2.data_to_send())
            if s.done.done():
                self._stream_closed(s)
        if kick:
            self._kick()
        if s._write_blocked and s._out_bytes < WRITE_LOW:
            s._on_writable()

    def _credit(self, s: HboneStream | None, n: int) -> None:
        """``n`` more received bytes were consumed: return credit once half a window's worth is due."""
        if self.lost:
            return
        queued = False
        if s is not None and not s.eof_received:
            s._recv_unacked += n
            if s._recv_unacked >= CREDIT_AT:
                self._send(frames.window_update(s.stream_id, s._recv_unacked))
                s._recv_window += s._recv_unacked
                s._recv_unacked = 0
                queued = True
        self._recv_unacked += n
        if self._recv_unacked >= CREDIT_AT:
            self._send(frames.window_update(0, self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
            queued = True
        if queued:
            self._kick()

    def _reset_stream(self, s: HboneStream, code: int) -> None:
        if self.lost:
            return
        try:
            self.h2.reset_stream(s.stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._send(self.h2.data_to_send())
        self._kick()

    def _stream_error(self, s: HboneStream, code: int, reason: str) -> None:
        """A stream error (RFC 9113 §5.4.2): the stream is reset both ways."""
        s._out.clear()
        s._out_bytes = 0
        s._on_reset(StreamReset(f"HTTP/2 stream error: {reason}"))
        self._reset_stream(s, code)

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
        self._send(self.h2.data_to_send())
        self._kick()

    def _stream_closed(self, s: HboneStream) -> None:
        if not s.done.done():
            return
        if (s._out or s._end_pending) and s.reset_exc is None and not self.lost:
            # done (both ends half-closed) with bytes still waiting for the peer's credit: the
            # stream stays until they and END_STREAM are sent (_flush_stream comes back here),
            # as a TCP socket sends its buffer after shutdown(SHUT_WR)
            return
        self.streams.pop(s.stream_id, None)
        # ztunnel 1.18: one CONNECT per connection; the client hangs up when its stream is over.
        if self.client_side and not self.streams and self.transport is not None and not self.lost:
            self.close_tls()

    def _terminate(self, exc: BaseException) -> None:
        for s in list(self.streams.values()):
            s._on_closed(exc)
        self.streams.clear()

    def send_request(self, headers: Headers) -> HboneStream:
        """Open a stream with ``headers`` (HEADERS without END_STREAM: a CONNECT's body follows)."""
        sid = self.h2.get_next_available_stream_id()
        stream = HboneStream(self, sid, self._peer_initial_window)
        self.streams[sid] = stream
        self.h2.send_headers(sid, headers, end_stream=False)
        self._send(self.h2.data_to_send())
        self._kick()
        return stream

    def close(self) -> None:
        """GOAWAY, close_notify, then the TCP connection closes once everything is written."""
        if self.transport is not None and not self.lost:
            try:
                self.h2.close_connection()
                self._send(self.h2.data_to_send())
            except h2.exceptions.ProtocolError:
                pass
            self.close_tls()
