"""HBONE: HTTP/2 CONNECT over mutual TLS 1.3, as ztunnel 1.18 speaks it (reference §5.1, §7).

Client (:func:`hbone_connect`) and server (:class:`HboneServer`) used by ztunnel, the sidecar's
HBONE legs and the waypoint. Behaviour mirrors ztunnel 1.18 (ZT-TLS ``boring.rs``, ZT-IN
``inbound.rs``, ZT-OUT ``outbound.rs``):

* TLS 1.3 only, ALPN ``h2`` required on both sides, no SNI, no hostname check; chains are verified
  against the lab CA; identities are URI SANs checked by us after the chain check:
  the client wants the server SAN == the expected identity; the server accepts any client cert
  whose SAN is in its trust domain.
* **Trust-domain mismatch = connection refused, not 401.** ztunnel 1.18 does this inside the
  BoringSSL verify callback (``Verifier::SanTrustDomain``), so the handshake itself fails and no
  HTTP is ever spoken. Python's ``ssl`` has no verify callback, so we check right after the
  handshake and abort the connection before reading any HTTP/2 byte; the client sees the
  connection die (``HboneTlsError``) exactly where a TLS 1.3 client sees BoringSSL's alert.
* The server cert is picked per accepted connection from its *local* (original destination) IP:
  ``cert_for(local_ip)``. ztunnel 1.18 fails the TLS accept for an unknown IP; the lab instead
  serves a default cert and answers every CONNECT on that connection with 404 (the status ztunnel
  gives for an unknown workload once TLS is up), which lets callers see *why*.
* Per CONNECT: non-CONNECT -> 404; ``:authority`` not ``ip:port`` -> 400; authority IP != the
  connection's local IP -> 400 (switch off for waypoints, ``check_authority=False``); unknown
  workload -> 404; then the caller's handler returns a status (401/404/503) or an upstream
  :class:`~netlab.mesh.relay.Endpoint`; on success 200 and bytes are relayed with half-close and
  reset propagation.
* HTTP/2 windows: 4 MiB stream and connection, max frame 1 MiB (``netlab.istio``).

Performance: asyncio Protocols end to end (no StreamReader), 1 MiB DATA frames, received DATA
chunks are handed to the other side without re-buffering, credit is returned as bytes leave.
Use :func:`netlab.mesh.relay.install_fast_loop` (uvloop) in proxy processes.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import h2
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame as _DataFrame

from netlab.istio import (
    CONNECT_TIMEOUT_S,
    DEFAULT_CLUSTER_NAME,
    HBONE_ALPN,
    HBONE_MAX_FRAME,
    HBONE_PORT,
    HBONE_WINDOW,
    TRUST_DOMAIN,
)
from netlab.mesh import _h2fast
from netlab.mesh.relay import (
    WRITE_HIGH,
    WRITE_LOW,
    Endpoint,
    RelayResult,
    StreamReset,
    accept_backlog,
    connect_socket,
    make_client_socket,
    relay,
    set_linger_zero,
)
from netlab.mesh.sockets import LISTEN_BACKLOG

__all__ = [
    "HboneError",
    "HboneTlsError",
    "HboneStream",
    "HboneServer",
    "ConnectRequest",
    "hbone_connect",
    "client_context",
    "server_context",
    "peer_uri_sans",
    "baggage_header",
    "parse_baggage",
    "forwarded_header",
    "parse_forwarded_for",
    "new_traceparent",
    "parse_authority",
    "BAGGAGE_HEADER",
    "FORWARDED_HEADER",
    "TRACEPARENT_HEADER",
]

log = logging.getLogger(__name__)
_h2fast.apply()

BAGGAGE_HEADER = "baggage"
FORWARDED_HEADER = "forwarded"
TRACEPARENT_HEADER = "traceparent"
H2_DEFAULT_WINDOW = 65535
# The lab's limit for a TLS handshake, both sides, and for the CONNECT response after it. Envoy's
# connect_originate ``connect_timeout: 2s`` (§5.2) covers TCP + TLS, but a BoringSSL handshake
# costs Envoy a fraction of what OpenSSL 3.0 + Python cost us (~1 ms CPU a side before any h2),
# so 1000 new connections on 2 shared cores queue for seconds; the 2 s stays on the TCP connect
# and the handshake gets ztunnel's 10 s (docs/deviations.md).
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# How long an accepted HBONE connection may take to finish the TLS handshake *and* send the
# HTTP/2 client preface (magic + SETTINGS), counted from accept. ztunnel 1.18 accepts through
# tls-listener 0.6 (its Cargo.toml), whose default handshake timeout is 10 s (tls-listener
# CHANGELOG 0.6.0: "Increased default handshake timeout to 10 seconds"); the lab applies it to
# the preface too, so a peer that completes mTLS and then says nothing is cut after 10 s
# instead of holding a connection (and its TLS state) forever.
HANDSHAKE_AND_PREFACE_TIMEOUT_S = TLS_HANDSHAKE_TIMEOUT_S
TLS_WRITE_HIGH = 2 * 1024 * 1024
TLS_WRITE_LOW = 512 * 1024
# The zero-copy receive path calls H2Connection._receive_frame and the send path drives h2's
# state machines directly (private, stable across h2 4.x); anything else uses the public API.
_FAST_RX = h2.__version__.startswith("4.") and hasattr(h2.connection.H2Connection, "_receive_frame")
try:
    from h2.connection import ConnectionInputs as _ConnectionInputs
    from h2.stream import StreamInputs as _StreamInputs

    _FAST_TX = _FAST_RX
except ImportError:  # pragma: no cover - other h2 versions
    _FAST_TX = False

PathLike = Union[str, "os.PathLike[str]"]
CertPair = tuple[PathLike, PathLike]


# ================================================================================================
# errors
# ================================================================================================
class HboneError(Exception):
    """CONNECT did not succeed. ``status`` is the HTTP status, or None if none was received."""

    def __init__(self, status: int | None, reason: str = "") -> None:
        self.status = status
        self.reason = reason
        self.local_addr: tuple[str, int] | None = None  # set when a TCP+TLS connection existed
        super().__init__(f"HBONE CONNECT failed: {status if status is not None else '-'} {reason}".rstrip())


class HboneTlsError(HboneError):
    """TLS failed: handshake, ALPN, the server's identity, or the server dropped us after it."""

    def __init__(self, reason: str) -> None:
        super().__init__(None, reason)


# ================================================================================================
# headers (ZT-PROXY, ZT-OUT)
# ================================================================================================
def baggage_header(
    *,
    namespace: str,
    workload_name: str,
    service_name: str | None = None,
    service_version: str = "latest",
    workload_type: str = "deployment",
    cluster: str = DEFAULT_CLUSTER_NAME,
) -> str:
    """``baggage`` value in ztunnel's format (k8s.cluster.name=...,...,service.version=...)."""
    return (
        f"k8s.cluster.name={cluster},k8s.namespace.name={namespace},"
        f"k8s.{workload_type}.name={workload_name},"
        f"service.name={service_name or workload_name},service.version={service_version}"
    )


def parse_baggage(value: str | None) -> dict[str, str]:
    """``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}`` (W3C baggage, properties dropped)."""
    out: dict[str, str] = {}
    for item in (value or "").split(","):
        k, sep, v = item.split(";", 1)[0].strip().partition("=")
        if sep and k:
            out[k.strip()] = v.strip()
    return out


def forwarded_header(client_ip: str) -> str:
    """RFC 7239 ``for=`` element; IPv6 is quoted and bracketed."""
    ip = ipaddress.ip_address(client_ip)
    return f'for="[{ip}]"' if ip.version == 6 else f"for={ip}"


_FOR_RE = re.compile(r'(?i)(?:^|[;,\s])for=("?)\[?([0-9a-fA-F:.]+)\]?(?::\d+)?\1')


def parse_forwarded_for(value: str | None) -> str | None:
    """First ``for=`` IP of a Forwarded header, or None (ztunnel ``get_original_src_from_fwded``)."""
    if not value:
        return None
    m = _FOR_RE.search(value)
    if not m:
        return None
    try:
        return str(ipaddress.ip_address(m.group(2)))
    except ValueError:
        return None


def new_traceparent() -> str:
    """``00-<32 hex trace id>-<16 hex parent id>-00`` (ZT-PROXY ``TraceParent``)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


def parse_authority(authority: str) -> tuple[str, int] | None:
    """``ip:port`` / ``[v6]:port`` -> (ip, port); None unless it is a literal socket address."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    p = int(port)
    if p > 65535:
        return None
    return str(ip), p


def format_authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# ================================================================================================
# TLS contexts
# ================================================================================================
def _base_context(purpose: int, cert: PathLike, key: PathLike, ca: PathLike | Sequence[PathLike]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([HBONE_ALPN])
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    for c in [ca] if isinstance(ca, (str, os.PathLike)) else ca:
        ctx.load_verify_locations(os.fspath(c))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


_ctx_cache: dict[tuple[Any, ...], ssl.SSLContext] = {}


def _cache_key(kind: str, cert: PathLike, key: PathLike, ca: PathLike | Sequence[PathLike]) -> tuple[Any, ...]:
    cas = (os.fspath(ca),) if isinstance(ca, (str, os.PathLike)) else tuple(os.fspath(c) for c in ca)
    return (kind, os.fspath(cert), os.fspath(key), cas)


def client_context(cert: PathLike, key: PathLike, ca: PathLike | Sequence[PathLike]) -> ssl.SSLContext:
    """Client side: our workload cert, verify the server chain, no hostname check (cached)."""
    k = _cache_key("c", cert, key, ca)
    ctx = _ctx_cache.get(k)
    if ctx is None:
        ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        _ctx_cache[k] = ctx
    return ctx


def server_context(cert: PathLike, key: PathLike, ca: PathLike | Sequence[PathLike]) -> ssl.SSLContext:
    """Server side: the destination workload's cert, client cert required (cached)."""
    k = _cache_key("s", cert, key, ca)
    ctx = _ctx_cache.get(k)
    if ctx is None:
        ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca)
        _ctx_cache[k] = ctx
    return ctx


def peer_uri_sans(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> list[str]:
    """URI SANs of the verified peer certificate."""
    if ssl_object is None:
        return []
    cert = ssl_object.getpeercert()
    if not cert:
        return []
    return [v for (t, v) in cert.get("subjectAltName", ()) if t == "URI"]


def _trust_domain(identity: str) -> str | None:
    if not identity.startswith("spiffe://"):
        return None
    return identity[len("spiffe://") :].split("/", 1)[0]


# ================================================================================================
# HTTP/2 stream endpoint
# ================================================================================================
class HboneStream(Endpoint):
    """One CONNECT stream as a byte stream (see :class:`~netlab.mesh.relay.Endpoint`).

    Attributes: ``status`` (response status), ``peer_identity`` (URI SAN of the TLS peer),
    ``local_addr``/``peer_addr`` of the TCP connection underneath, ``stream_id``.
    """

    def __init__(self, conn: _H2Conn, stream_id: int) -> None:
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_bytes = 0
        self._end_pending = False
        self._unacked = 0  # flow-control credit held back while paused
        self.status: int | None = None
        self.response_headers: list[tuple[str, str]] = []
        self._response: asyncio.Future[list[tuple[str, str]]] = self._loop.create_future()

    # identity / addresses of the connection
    @property
    def peer_identity(self) -> str | None:
        return self._conn.peer_identity

    @property
    def local_addr(self) -> tuple[Any, ...]:
        return self._conn.local_addr

    @property
    def peer_addr(self) -> tuple[Any, ...]:
        return self._conn.peer_addr

    # ---- Endpoint hooks -----------------------------------------------------------------------
    def _t_write(self, data: bytes | memoryview) -> None:
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


# ================================================================================================
# HTTP/2 connection (one per TLS connection)
# ================================================================================================
class _H2Conn(asyncio.Protocol):
    """h2 state machine bound to an asyncio TLS transport."""

    def __init__(
        self,
        client_side: bool,
        on_request: Callable[[_H2Conn, HboneStream, list[tuple[str, str]]], None] | None = None,
        check: Callable[[_H2Conn], str | None] | None = None,
    ) -> None:
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.client_side = client_side
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, HboneStream] = {}
        self._on_request = on_request
        self._check = check
        self._paused = False
        self.failed: str | None = None
        self.peer_identity: str | None = None
        self.peer_identities: list[str] = []
        self.local_addr: tuple[Any, ...] = ()
        self.peer_addr: tuple[Any, ...] = ()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.preface: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # peer's SETTINGS seen
        self._lost = False
        self.extra: dict[str, Any] = {}  # free slot for the owner (e.g. "known workload")
        self._fast = False
        self._rbuf = bytearray()
        self._data_left = 0
        self._data_sid = 0
        self._data_end = False

    # ---- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local_addr = transport.get_extra_info("sockname")
        self.peer_addr = transport.get_extra_info("peername")
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
            set_linger_zero(transport.get_extra_info("socket"))
            transport.abort()
            return
        self.transport.set_write_buffer_limits(high=TLS_WRITE_HIGH, low=TLS_WRITE_LOW)
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
            if self._fast:
                events = self._receive_fast(data)
            else:
                events = self.h2.receive_data(data)
                ib = self.h2.incoming_buffer
                # switch to the zero-copy DATA path at a clean frame boundary after the preface
                self._fast = _FAST_RX and not ib._preamble_len and not ib._data and not ib._headers_buffer
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
        self._lost = True
        self._terminate(exc or StreamReset("HBONE connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._release()

    def _release(self) -> None:
        """Let go of the TLS transport and the h2 state as soon as the connection is gone.

        Streams outlive their connection (a relay or a log line may still hold one, and each
        holds ``_conn``), and h2's ``H2Connection`` refers to itself through its frame dispatch
        table of bound methods, so without this a closed connection's TLS transport (uvloop's
        SSLProtocol has a 256 KiB read buffer, plus the OpenSSL SSL object and its BIOs) and
        the h2 state (streams, HPACK tables, ~350 objects) waited for a full cyclic GC pass,
        which a proxy with many long-lived objects runs rarely: RSS grew with every
        connection handled. Nothing uses either once ``_lost`` is set.
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

    def _receive_fast(self, data: bytes) -> list[h2.events.Event]:
        """Frame the input ourselves so DATA payloads reach h2 as zero-copy memoryview pieces.

        h2's FrameBuffer copies every payload three times (append, slice, ``tobytes``), which
        doubled the server's CPU per byte. Here a DATA frame's payload is handed to h2's frame
        handler piece by piece as it arrives (h2 accounts flow control per byte, so splitting a
        frame is invisible to it); every other frame, and padded DATA, is passed whole to
        ``receive_data`` so h2 still validates it.
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
                f = _DataFrame(self._data_sid, data=mv[pos : pos + take])
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
            if ftype == 0x0 and not flags & 0x8 and len(rbuf) == 9:  # DATA, not PADDED
                if length > h.max_inbound_frame_size:
                    raise h2.exceptions.FrameTooLargeError(f"DATA frame of {length} bytes")
                sid = int.from_bytes(rbuf[5:9], "big") & 0x7FFFFFFF
                if sid == 0:
                    raise h2.exceptions.ProtocolError("DATA frame on stream 0")
                rbuf.clear()
                self._data_sid, self._data_end, self._data_left = sid, bool(flags & 0x1), length
                if length == 0:
                    f = _DataFrame(sid, data=b"")
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
                self._on_request(self, s, list(ev.headers))  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.ResponseReceived):
            if (s := self.streams.get(ev.stream_id)) is not None and not s._response.done():
                s._response.set_result(list(ev.headers))  # type: ignore[arg-type]
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
        if data and self.transport is not None and not self._lost:
            self.transport.write(data)

    def _flush_stream(self, s: HboneStream, send: bool = True) -> None:
        if self._lost or s.reset_exc is not None:
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
        if self._lost or n <= 0:
            return
        try:
            self.h2.acknowledge_received_data(n, s.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._send()

    def _reset_stream(self, s: HboneStream, code: ErrorCodes) -> None:
        if self._lost:
            return
        try:
            self.h2.reset_stream(s.stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._send()

    def send_response(self, s: HboneStream, status: int) -> None:
        s.status = status
        if self._lost:
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
        if self.client_side and not self.streams and self.transport is not None and not self._lost:
            self._send()
            self.transport.close()

    def _terminate(self, exc: BaseException) -> None:
        for s in list(self.streams.values()):
            s._on_closed(exc)
        self.streams.clear()

    def abort(self) -> None:
        """Drop the connection with a TCP RST, saying nothing more."""
        if self.transport is not None and not self._lost:
            set_linger_zero(self.transport.get_extra_info("socket"))
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self._lost:
            try:
                self.h2.close_connection()
                self._send()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()


# ================================================================================================
# client
# ================================================================================================
HeadersArg = Union[Mapping[str, str], Iterable[tuple[str, str]], None]


def _header_list(headers: HeadersArg) -> list[tuple[str, str]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k.lower(), v) for k, v in items]


async def hbone_connect(
    addr: tuple[str, int],
    authority: str,
    *,
    client_cert: PathLike,
    client_key: PathLike,
    ca: PathLike | Sequence[PathLike],
    expected_identity: str | Sequence[str] | None,
    headers: HeadersArg = None,
    source: tuple[str, int] | None = None,
    transparent: bool = False,
    sock: socket.socket | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
    tls_timeout: float | None = None,
    method: str = "CONNECT",
) -> HboneStream:
    """Open one HBONE tunnel: TCP (+spoofed source) -> mTLS 1.3/h2 -> CONNECT ``authority``.

    ``addr`` is the HBONE endpoint (peer pod or waypoint IP, port 15008). ``sock`` may be a
    pre-made (e.g. IP_TRANSPARENT, bound) unconnected socket; otherwise one is made from
    ``source``/``transparent`` like ztunnel's ``freebind_connect``. ``expected_identity`` is the
    SPIFFE ID the server must present (a list accepts any of them; None skips the check, for
    tests only). Returns the stream after a 200; raises :class:`HboneError` (status set) for
    other statuses and :class:`HboneTlsError` for TLS/identity failures.

    ``timeout`` bounds the TCP connect. ``tls_timeout`` bounds the TLS handshake and, separately,
    the wait for the CONNECT response; default: :data:`TLS_HANDSHAKE_TIMEOUT_S`, or ``timeout``
    if that is longer.
    """
    loop = asyncio.get_running_loop()
    if tls_timeout is None:
        tls_timeout = max(timeout, TLS_HANDSHAKE_TIMEOUT_S)
    if sock is None:
        sock = make_client_socket(addr, source, transparent)
    try:
        try:
            await connect_socket(sock, addr, timeout)
        except OSError as e:
            raise HboneError(None, f"connect {addr[0]}:{addr[1]}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        ctx = client_context(client_cert, client_key, ca)
        wanted = [expected_identity] if isinstance(expected_identity, str) else expected_identity

        def check(conn: _H2Conn) -> str | None:
            if wanted is not None and not any(i in wanted for i in conn.peer_identities):
                return f"server identity {conn.peer_identities} != expected {list(wanted)}"
            return None

        conn = _H2Conn(client_side=True, check=check)
        try:
            await loop.create_connection(
                lambda: conn, sock=sock, ssl=ctx, server_hostname="", ssl_handshake_timeout=tls_timeout
            )
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
            conn._release()  # connection_made/connection_lost will never come
            # e's traceback runs through the loop's frames holding the failed waiter (which holds
            # e): a cycle that would pin our frames (conn, sock); the message is what matters
            raise HboneTlsError(f"TLS handshake with {addr[0]}:{addr[1]} failed: {e!r}") from e.with_traceback(None)
    except BaseException:
        sock.close()
        raise
    if conn.failed:
        raise HboneTlsError(conn.failed)
    try:
        return await _open_stream(conn, authority, headers, tls_timeout, method, f"{addr[0]}:{addr[1]}")
    except HboneError as e:
        if e.status is not None:  # refused over a real connection: keep its 4-tuple for the logs/trace
            try:
                e.local_addr = sock.getsockname()[:2]
            except OSError:
                pass
        conn.close()
        raise


async def _open_stream(
    conn: _H2Conn, authority: str, headers: HeadersArg, timeout: float, method: str = "CONNECT", peer: str = ""
) -> HboneStream:
    """Send one request on an established connection and wait for its response.

    ztunnel 1.18 sends exactly one CONNECT per connection (what :func:`hbone_connect` does);
    this is separate so tests can open more streams on one connection (the server supports it).
    """
    hdrs = [(":method", method), (":authority", authority)]
    if method != "CONNECT":
        hdrs += [(":scheme", "https"), (":path", "/")]
    hdrs += _header_list(headers)
    if conn._lost:
        raise HboneTlsError(f"connection to {peer} closed before a request")
    try:
        sid = conn.h2.get_next_available_stream_id()
        stream = HboneStream(conn, sid)
        conn.streams[sid] = stream
        conn.h2.send_headers(sid, hdrs, end_stream=False)
        conn._send()
        try:
            resp = await asyncio.wait_for(asyncio.shield(stream._response), timeout)
        except (StreamReset, ConnectionError) as e:
            raise HboneTlsError(f"connection to {peer} closed before a response: {e}") from e
        except asyncio.TimeoutError:
            raise HboneError(None, "timed out waiting for the CONNECT response") from None
    except HboneError:
        raise
    except BaseException:
        conn.close()
        raise
    stream.response_headers = resp
    status_s = dict(resp).get(":status", "0")
    stream.status = int(status_s) if status_s.isdigit() else 0
    if stream.status != 200:
        stream._finish()
        raise HboneError(stream.status, f"from {peer} for {authority}")
    return stream


# ================================================================================================
# server
# ================================================================================================
@dataclass(frozen=True)
class ConnectRequest:
    """What an HBONE server handler sees for one CONNECT stream."""

    authority: str
    dest: tuple[str, int] | None  # parsed authority
    peer_identity: str | None  # first URI SAN of the client cert
    peer_addr: tuple[Any, ...]  # TCP source of the HBONE connection
    local_addr: tuple[Any, ...]  # TCP destination (the original destination under TPROXY)
    headers: tuple[tuple[str, str], ...] = ()  # regular headers, lower-case names
    peer_identities: tuple[str, ...] = ()
    stream: HboneStream | None = field(default=None, compare=False, repr=False)

    def header(self, name: str) -> str | None:
        name = name.lower()
        vals = [v for k, v in self.headers if k == name]
        return ",".join(vals) if vals else None

    @property
    def baggage(self) -> dict[str, str]:
        return parse_baggage(self.header(BAGGAGE_HEADER))

    @property
    def forwarded_for(self) -> str | None:
        return parse_forwarded_for(self.header(FORWARDED_HEADER))

    @property
    def traceparent(self) -> str | None:
        return self.header(TRACEPARENT_HEADER)


HandlerResult = Union[int, Endpoint]
Handler = Callable[[ConnectRequest], Awaitable[HandlerResult]]
CertFor = Callable[[str], Union[CertPair, None]]


class HboneServer:
    """HBONE listener (ztunnel inbound :15008 / waypoint ``connect_terminate``).

    ``handler(req)`` returns an int status to reject with, or an upstream Endpoint (e.g. from
    :func:`netlab.mesh.relay.tcp_connect`) to relay to; OSError/TimeoutError from it -> 503.
    ``on_relay_done(req, result)`` is called once per finished 200 stream (one log line per leg).
    """

    def __init__(
        self,
        *,
        handler: Handler,
        cert_for: CertFor,
        default_cert: CertPair,
        ca: PathLike | Sequence[PathLike],
        trust_domain: str = TRUST_DOMAIN,
        check_authority: bool = True,
        on_relay_done: Callable[[ConnectRequest, RelayResult], None] | None = None,
        handshake_timeout: float = HANDSHAKE_AND_PREFACE_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.cert_for = cert_for
        self.default_cert = default_cert
        self.ca = ca
        self.trust_domain = trust_domain
        self.check_authority = check_authority
        self.on_relay_done = on_relay_done
        self.handshake_timeout = handshake_timeout
        self._lsock: socket.socket | None = None
        self._own_sock = False
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conns: set[_H2Conn] = set()
        self.stats = collections.Counter[str]()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(
        self, sock: socket.socket | None = None, host: str = "0.0.0.0", port: int = HBONE_PORT,
        backlog: int = LISTEN_BACKLOG,
    ) -> HboneServer:
        """Listen on ``sock`` (already bound+listening is fine, e.g. IP_TRANSPARENT) or host:port."""
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            self._own_sock = True
        try:
            sock.listen(backlog)
        except OSError:
            pass
        sock.setblocking(False)
        self._lsock = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        return self

    @property
    def sockname(self) -> tuple[Any, ...]:
        assert self._lsock is not None
        return self._lsock.getsockname()

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            try:
                await self._accept_task
            except (asyncio.CancelledError, Exception):
                pass
            self._accept_task = None
        for c in list(self._conns):
            c.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lsock is not None and self._own_sock:
            self._lsock.close()
        self._lsock = None

    async def __aenter__(self) -> HboneServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- connections --------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._lsock)
            except (ConnectionAbortedError, ConnectionResetError):
                continue
            except OSError as e:
                log.warning("hbone: accept failed: %s", e)
                await asyncio.sleep(0.05)
                continue
            self._spawn(self._serve_conn(sock))
            for sock in accept_backlog(self._lsock):
                self._spawn(self._serve_conn(sock))

    def _check_peer(self, conn: _H2Conn) -> str | None:
        if not any(_trust_domain(i) == self.trust_domain for i in conn.peer_identities):
            return f"client identities {conn.peer_identities} not in trust domain {self.trust_domain}"
        return None

    async def _serve_conn(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout  # TLS handshake and HTTP/2 preface
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local_ip = sock.getsockname()[0]
            pair = self.cert_for(local_ip)
            known = pair is not None
            cert, key = pair if pair is not None else self.default_cert
            ctx = server_context(cert, key, self.ca)
        except Exception:
            log.exception("hbone: cannot set up TLS for an accepted connection")
            sock.close()
            return
        conn = _H2Conn(client_side=False, on_request=self._on_request, check=self._check_peer)
        conn.extra["known"] = known
        try:
            await loop.connect_accepted_socket(
                lambda: conn, sock, ssl=ctx, ssl_handshake_timeout=self.handshake_timeout
            )
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
            self.stats["tls_failed"] += 1
            log.info("hbone: TLS handshake failed: %r", e)
            conn._release()  # connection_made/connection_lost will never come
            e.with_traceback(None)  # a cycle through the loop's waiter otherwise (see hbone_connect)
            sock.close()
            return
        if conn.failed:
            self.stats["tls_rejected"] += 1
            return
        if not await self._preface_by(conn, deadline):
            return
        self.stats["connections"] += 1
        self._conns.add(conn)
        try:
            await conn.closed
        finally:
            self._conns.discard(conn)

    async def _preface_by(self, conn: _H2Conn, deadline: float) -> bool:
        """Wait until the client's HTTP/2 preface arrived; past ``deadline``, reset the connection."""
        if not conn.preface.done():
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait({conn.preface, conn.closed}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if conn.preface.done():
            return True
        if not conn.closed.done():
            self.stats["preface_timeout"] += 1
            log.info("hbone: no HTTP/2 preface from %s within %gs of accept; resetting", conn.peer_addr,
                     self.handshake_timeout)
            conn.abort()
        return False

    def _on_request(self, conn: _H2Conn, stream: HboneStream, headers: list[tuple[str, str]]) -> None:
        self._spawn(self._serve_stream(conn, stream, headers))

    async def _serve_stream(self, conn: _H2Conn, stream: HboneStream, headers: list[tuple[str, str]]) -> None:
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        regular = tuple((k, v) for k, v in headers if not k.startswith(":"))
        authority = pseudo.get(":authority", "")
        dest = parse_authority(authority)
        req = ConnectRequest(
            authority=authority,
            dest=dest,
            peer_identity=conn.peer_identity,
            peer_addr=conn.peer_addr,
            local_addr=conn.local_addr,
            headers=regular,
            peer_identities=tuple(conn.peer_identities),
            stream=stream,
        )
        status = self._precheck(conn, pseudo.get(":method"), dest)
        upstream: Endpoint | None = None
        if status is None:
            try:
                result = await self.handler(req)
            except (OSError, asyncio.TimeoutError) as e:
                log.info("hbone: upstream for %s failed: %s", authority, e)
                result = 503
            except Exception:
                log.exception("hbone: handler failed for %s", authority)
                result = 503
            if isinstance(result, Endpoint):
                upstream = result
            else:
                status = int(result)
        self.stats[str(status or 200)] += 1
        if upstream is None:
            conn.send_response(stream, status or 503)  # with END_STREAM: the stream is over
            stream._finish()
            return
        if stream.done.done():  # client gave up while we were connecting
            upstream.abort()
            return
        conn.send_response(stream, 200)
        res = await relay(stream, upstream)
        if self.on_relay_done is not None:
            try:
                self.on_relay_done(req, res)
            except Exception:
                log.exception("hbone: on_relay_done failed")

    def _precheck(self, conn: _H2Conn, method: str | None, dest: tuple[str, int] | None) -> int | None:
        if method != "CONNECT":
            return 404
        if dest is None:
            return 400
        if self.check_authority:
            local_ip = conn.local_addr[0] if conn.local_addr else None
            if local_ip is None or ipaddress.ip_address(dest[0]) != ipaddress.ip_address(local_ip):
                return 400
        if not conn.extra.get("known", True):
            return 404
        return None
