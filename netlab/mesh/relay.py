"""Byte-stream endpoints and the relay that splices two of them (ztunnel ``copy_hbone``/``relay``).

Every proxy leg in the lab is "plain TCP on one side, an HBONE stream (or TCP) on the other".
Both kinds implement :class:`Endpoint`, which offers two faces over one implementation:

* a *pull* API for simple callers (``await read()``, ``write()``, ``await drain()``,
  ``write_eof()``, ``close()``, ``abort()``);
* a *push* face used by :func:`relay`: data callbacks go straight into the other endpoint's
  ``write`` with no task, queue or ``await`` per chunk, and back-pressure is a pause/resume pair
  (TCP: stop reading the socket; HBONE: stop returning HTTP/2 flow-control credit).

Semantics that the mesh relies on (RFC 9113 §8.5, ztunnel ``copy_hbone``):

* half-close is passed on: TCP FIN -> END_STREAM and END_STREAM -> ``shutdown(SHUT_WR)``;
* a reset is passed on as a reset, never as a clean end with missing bytes: TCP RST ->
  RST_STREAM(CONNECT_ERROR) and RST_STREAM -> TCP RST (``SO_LINGER`` 0 then close).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import os
import socket
import struct
import termios
from dataclasses import dataclass
from typing import Any

from netlab.istio import CONNECT_TIMEOUT_S

__all__ = [
    "Endpoint",
    "TcpStream",
    "StreamReset",
    "RelayResult",
    "relay",
    "tcp_connect",
    "tcp_stream_from_socket",
    "make_client_socket",
    "accept_backlog",
    "set_linger_zero",
    "install_fast_loop",
    "enable_idle_heap_trim",
    "IP_TRANSPARENT",
    "IP_FREEBIND",
]

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

# Pull-mode receive buffer watermarks (TCP): pause the socket above HIGH, resume below LOW.
READ_HIGH = 4 * 1024 * 1024
READ_LOW = 1024 * 1024
# Write-side watermarks: above HIGH the producer feeding us is paused.
WRITE_HIGH = 4 * 1024 * 1024
WRITE_LOW = 1024 * 1024

OUTCOME_OK = "ok"
OUTCOME_DOWNSTREAM_RESET = "downstream_reset"
OUTCOME_UPSTREAM_RESET = "upstream_reset"


class StreamReset(ConnectionResetError):
    """The peer reset the stream (TCP RST, RST_STREAM, or the HBONE connection died)."""


def install_fast_loop() -> bool:
    """Proxy-process setup: uvloop for new event loops if it is installed (returns whether it
    is), and :func:`enable_idle_heap_trim`."""
    enable_idle_heap_trim()
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# ---- giving freed heap back once a burst is over ---------------------------------------------
IDLE_TRIM_S = 0.5
_trim_interval: float | None = None
_trim_loop: asyncio.AbstractEventLoop | None = None
_malloc_trim: Any = None


def enable_idle_heap_trim(interval: float = IDLE_TRIM_S) -> bool:
    """Call glibc ``malloc_trim(0)`` when a burst of connections is over.

    A burst peaks at (connections x bytes in flight): TLS buffers, h2 frames, relayed chunks.
    glibc keeps what they freed (fragmented heap, raised mmap threshold), so a proxy's RSS
    stayed at the burst's peak after every connection was gone. Checked every ``interval`` s on
    the loop of the first endpoint made: it trims when endpoints finished since the last trim
    and now none is open, or none was made or finished during the last interval. So at most
    once per interval, and not at all while connections keep coming and going. Returns False
    where there is no ``malloc_trim`` (not glibc).
    """
    global _trim_interval, _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _trim_interval = interval
    return True


def _arm_trim(loop: asyncio.AbstractEventLoop) -> None:
    global _trim_loop
    if _trim_interval is None or _trim_loop is loop:
        return
    _trim_loop = loop
    state = {"seen": (-1, -1), "trimmed": Endpoint.n_finished}

    def tick() -> None:
        if _trim_loop is not loop or loop.is_closed():
            return
        now = (Endpoint.n_created, Endpoint.n_finished)
        if now[1] != state["trimmed"] and (now[0] == now[1] or now == state["seen"]):
            state["trimmed"] = now[1]
            _malloc_trim(0)
        state["seen"] = now
        loop.call_later(_trim_interval or IDLE_TRIM_S, tick)

    loop.call_later(_trim_interval, tick)


def set_linger_zero(sock: Any) -> None:
    """Make the next close() send RST instead of FIN (how a reset is passed on to TCP)."""
    if sock is None:  # uvloop: the transport's handle is already closed
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class Endpoint:
    """One end of a bidirectional byte stream; subclasses provide the transport hooks.

    Hooks (all synchronous): ``_t_write(data)``, ``_t_write_eof()``, ``_t_abort()``,
    ``_t_close()``, ``_t_pause()``, ``_t_resume()``, ``_t_consumed(n)`` (n received bytes
    left our hands: HBONE returns flow-control credit here).

    Transports report with ``_on_data``, ``_on_eof``, ``_on_reset``, ``_on_write_blocked``,
    ``_on_writable`` and ``_on_closed``.
    """

    n_created = 0  # endpoints made / finished in this process (idle detection for the heap trim)
    n_finished = 0

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        Endpoint.n_created += 1
        if _trim_interval is not None and _trim_loop is not self._loop:
            _arm_trim(self._loop)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._sink: Endpoint | None = None  # relay mode: received data goes here
        self._producer: Endpoint | None = None  # relay mode: who to pause when we're full
        self._pause_reasons: set[str] = set()
        self._write_blocked = False
        self.eof_received = False
        self.eof_sent = False
        self.reset_exc: BaseException | None = None  # set once the stream was reset either way
        self.reset_by_peer = False
        self.bytes_received = 0
        self.bytes_sent = 0
        self.done: asyncio.Future[None] = self._loop.create_future()

    # ---- hooks for subclasses ---------------------------------------------------------------
    def _t_write(self, data: bytes | memoryview) -> None: raise NotImplementedError
    def _t_write_eof(self) -> None: raise NotImplementedError
    def _t_abort(self) -> None: raise NotImplementedError
    def _t_close(self) -> None: raise NotImplementedError
    def _t_pause(self) -> None: raise NotImplementedError
    def _t_resume(self) -> None: raise NotImplementedError
    def _t_consumed(self, n: int) -> None: pass

    # ---- transport -> endpoint ----------------------------------------------------------------
    def _on_data(self, data: bytes | memoryview) -> None:
        n = len(data)
        self.bytes_received += n
        sink = self._sink
        if sink is not None:
            sink.write(data)
            self._t_consumed(n)
            return
        self._chunks.append(data)
        self._buffered += n
        if self._buffered > READ_HIGH:
            self._pause("reader")
        self._wake_reader()

    def _on_eof(self) -> None:
        if self.eof_received:
            return
        self.eof_received = True
        if self._sink is not None:
            self._sink.write_eof()
        self._wake_reader()
        self._check_done()

    def _on_reset(self, exc: BaseException | None = None) -> None:
        """The peer (or the connection under us) reset the stream."""
        if self.reset_exc is not None or (self.eof_received and self.eof_sent and self.done.done()):
            return
        self.reset_exc = exc if isinstance(exc, BaseException) else StreamReset("stream reset by peer")
        self.reset_by_peer = True
        if self._sink is not None:
            self._sink.abort()
        self._finish()

    def _on_write_blocked(self) -> None:
        self._write_blocked = True
        if self._producer is not None:
            self._producer._pause("sink")

    def _on_writable(self) -> None:
        self._write_blocked = False
        if self._producer is not None:
            self._producer._resume("sink")
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _on_closed(self, exc: BaseException | None) -> None:
        """The transport is gone; without a clean end in both directions that is a reset."""
        if exc is not None or not self.eof_received:
            if not self.done.done() and self.reset_exc is None:
                self._on_reset(exc or StreamReset("connection closed before end of stream"))
        self._finish()

    # ---- internal helpers -------------------------------------------------------------------
    def _reset_error(self) -> BaseException:
        """A fresh copy of ``reset_exc`` to raise or to put in a waiter.

        Raising the stored exception itself would hang the raising frames (and with them this
        endpoint, its transport and TLS state) on its ``__traceback__``: a reference cycle that
        only the cyclic GC can free, and a traceback that grows with every raise.
        """
        exc = self.reset_exc
        assert exc is not None
        try:
            return type(exc)(*exc.args)
        except Exception:  # noqa: BLE001 - an exception type with an unusual __init__
            return StreamReset(str(exc))

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons:
            self._pause_reasons.add(reason)
            self._t_pause()
        else:
            self._pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons:
                self._t_resume()

    def pause_reading(self, reason: str = "owner") -> None:
        """Stop taking bytes from the peer (TCP: stop reading the socket, so the kernel buffers
        and TCP flow control pushes back; HBONE: return no flow-control credit) until
        :meth:`resume_reading` with the same ``reason``."""
        self._pause(reason)

    def resume_reading(self, reason: str = "owner") -> None:
        self._resume(reason)

    @property
    def reading_paused(self) -> bool:
        return bool(self._pause_reasons)

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _check_done(self) -> None:
        if self.eof_received and self.eof_sent:
            self._finish()

    def _finish(self) -> None:
        self._wake_reader()
        for w in self._drain_waiters:
            if not w.done():
                if self.reset_exc is not None:
                    w.set_exception(self._reset_error())
                else:
                    w.set_result(None)
        self._drain_waiters = []
        if not self.done.done():
            Endpoint.n_finished += 1
            self.done.set_result(None)

    # ---- pull API -----------------------------------------------------------------------------
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all buffered ones if ``n`` < 0); ``b""`` at EOF; raises on reset."""
        while not self._chunks:
            if self.reset_exc is not None and self.reset_by_peer:
                raise self._reset_error()
            if self.eof_received or self.reset_exc is not None:
                return b""
            self._read_waiter = self._loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if n < 0 or n >= self._buffered:
            data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks.clear()
            if type(data) is not bytes:
                data = bytes(data)  # HBONE hands over zero-copy memoryviews
        else:
            parts = []
            need = n
            while need:
                c = self._chunks[0]
                if len(c) <= need:
                    parts.append(self._chunks.popleft())
                    need -= len(c)
                else:
                    parts.append(c[:need])
                    self._chunks[0] = c[need:]
                    need = 0
            data = b"".join(parts)
        self._buffered -= len(data)
        self._t_consumed(len(data))
        if self._buffered < READ_LOW:
            self._resume("reader")
        return data

    async def readexactly(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            d = await self.read(n - got)
            if not d:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(d)
            got += len(d)
        return b"".join(parts)

    async def read_all(self) -> bytes:
        """Everything until EOF."""
        parts = []
        while d := await self.read():
            parts.append(d)
        return b"".join(parts)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.reset_exc is not None:
            return  # like a transport after abort: silently dropped, the reset is reported
        if self.eof_sent:
            raise RuntimeError("write after write_eof")
        if not data:
            return
        self.bytes_sent += len(data)
        self._t_write(data)

    async def drain(self) -> None:
        """Wait until the write buffer is below the low watermark; raises if the stream reset."""
        if self.reset_exc is not None:
            raise self._reset_error()
        if not self._write_blocked:
            return
        w = self._loop.create_future()
        self._drain_waiters.append(w)
        await w

    def write_eof(self) -> None:
        """Half-close: FIN on TCP, END_STREAM on HBONE (after all queued data)."""
        if self.eof_sent or self.reset_exc is not None:
            return
        self.eof_sent = True
        self._t_write_eof()
        self._check_done()

    def abort(self) -> None:
        """Reset: TCP RST (SO_LINGER 0) or RST_STREAM(CONNECT_ERROR); queued data is dropped."""
        if self.reset_exc is not None or self.done.done():
            return
        self.reset_exc = StreamReset("stream aborted locally")
        self._t_abort()
        self._finish()

    def close(self) -> None:
        """End the stream: graceful if the peer already finished sending, else a reset."""
        if self.done.done() and self.reset_exc is None and self.eof_received and self.eof_sent:
            self._t_close()
            return
        if self.reset_exc is not None:
            self._t_close()
            return
        if self.eof_received:
            self.write_eof()
            self._t_close()
        else:
            self.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.done)

    # relay attach: flush pull-buffer into the sink first
    def _attach(self, sink: Endpoint) -> int:
        moved = 0
        while self._chunks:
            c = self._chunks.popleft()
            sink.write(c)
            moved += len(c)
        self._buffered = 0
        if moved:
            self._t_consumed(moved)
        self._sink = sink
        sink._producer = self
        self._resume("reader")
        if sink._write_blocked:
            self._pause("sink")
        if self.eof_received:
            sink.write_eof()
        if self.reset_exc is not None and self.reset_by_peer:
            sink.abort()
        return moved


# ================================================================================================
# TCP
# ================================================================================================
class _TcpProtocol(asyncio.Protocol):
    def __init__(self, ep: TcpStream) -> None:
        self.ep = ep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.ep._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # (a TCP -> TCP relay replaces this method by the other socket's write: TcpStream._go_direct)
        self.ep._on_data(data)

    def eof_received(self) -> bool:
        self.ep._on_eof()
        return True  # keep the write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        ep = self.ep
        ep._leave_direct()  # the kernel's final count, before the socket is really gone
        ep._on_closed(exc)
        # the transport has let go of us; TcpStream.protocol <-> self.ep would otherwise be a
        # cycle that keeps the endpoint (and what it buffered) until the cyclic GC runs
        ep.protocol = None  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.ep._on_write_blocked()

    def resume_writing(self) -> None:
        self.ep._on_writable()


class TcpStream(Endpoint):
    """A plain TCP connection as an :class:`Endpoint` (asyncio Protocol underneath)."""

    def __init__(self) -> None:
        super().__init__()
        self._transport: asyncio.Transport | None = None
        self.protocol = _TcpProtocol(self)
        self._ksock: socket.socket | None = None  # direct relay: our own reference to the socket
        self._k0 = 0

    # ---- direct relay: TCP -> TCP with no Python code per chunk ----------------------------------
    def _go_direct(self, sink: "TcpStream") -> bool:
        """Hand every chunk this socket receives straight to ``sink``'s transport ``write``.

        Why: in a TCP -> TCP relay (ztunnel inbound plaintext, sidecar legs) the only Python
        left per chunk was ``data_received`` itself, about half of the proxy's user-space time
        (perf, 64-byte echo at 50 connections; without it ztunnel's CPU per request went from
        24.6 to 23.6 us, haproxy's is 23.4-25.5). With the protocol's ``data_received`` set to the other transport's
        (C-level) ``write`` and the transport told again (``set_protocol``: uvloop caches the
        method), no Python frame runs per chunk. EOF, reset, pause/resume still go through the
        protocol's other methods, so half-close, reset propagation and back-pressure are as before.

        The byte count then comes from the kernel (TCP_INFO ``bytes_received`` less what is
        still unread and the FIN), read through a ``dup`` of the socket so that it can still be
        read after the transport has closed its own fd (a reset by the peer); the dup is
        closed in ``connection_lost``, so the socket really goes (FIN or RST) at that point,
        one loop iteration after the transport let go of it. ``sink.bytes_sent`` is not kept
        up to date in this mode (nothing reads it: a relay reports what each side received).
        """
        t, st = self._transport, sink._transport
        if t is None or st is None or t.is_closing() or st.is_closing() or self._ksock is not None:
            return False
        sock = t.get_extra_info("socket")
        if sock is None or sock.fileno() < 0:
            return False
        try:
            self._ksock = socket.socket(sock.family, socket.SOCK_STREAM, 0, os.dup(sock.fileno()))
            self._k0 = _app_bytes_read(self._ksock, self.eof_received) - self.bytes_received
        except OSError:  # out of fds (EMFILE), or the socket just went: relay it the Python way
            if self._ksock is not None:
                self._ksock.close()
                self._ksock = None
            return False
        self.protocol.data_received = st.write  # type: ignore[method-assign]
        t.set_protocol(self.protocol)
        return True

    def _sync_direct(self) -> None:
        """``bytes_received`` from the kernel's count (direct mode only)."""
        if self._ksock is not None:
            try:
                self.bytes_received = _app_bytes_read(self._ksock, self.eof_received) - self._k0
            except OSError:
                pass

    def _leave_direct(self) -> None:
        if self._ksock is not None:
            self._sync_direct()
            self._ksock.close()
            self._ksock = None
            self.protocol.__dict__.pop("data_received", None)

    @property
    def sock(self) -> Any:
        return self._transport.get_extra_info("socket") if self._transport else None

    @property
    def local_addr(self) -> tuple[Any, ...]:
        return self._transport.get_extra_info("sockname")

    @property
    def peer_addr(self) -> tuple[Any, ...]:
        return self._transport.get_extra_info("peername")

    def _t_write(self, data: bytes | memoryview) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def _t_write_eof(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write_eof()

    def _t_abort(self) -> None:
        self._sync_direct()
        if self._transport is not None:
            set_linger_zero(self._transport.get_extra_info("socket"))
            self._transport.abort()

    def _t_close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _t_pause(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def _t_resume(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _check_done(self) -> None:
        super()._check_done()
        # both halves closed cleanly: release the socket (asyncio flushes the buffer first)
        if self.eof_received and self.eof_sent and self._transport is not None:
            self._transport.close()


_TCP_INFO_LEN = 136  # through tcpi_bytes_received (Linux >= 4.1)
_FIN_RECEIVED_STATES = (6, 8, 9, 11)  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING


def _app_bytes_read(sock: socket.socket, eof_seen: bool) -> int:
    """Bytes of payload the kernel has handed to the application on TCP socket ``sock``.

    ``tcpi_bytes_received`` counts sequence space up to ``rcv_nxt``: payload and, once it
    arrived, the FIN (1). Less what still sits unread (SIOCINQ, which leaves the FIN out) and
    the FIN, that is what ``read`` has returned so far.
    """
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    inq = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    (received,) = struct.unpack_from("=Q", raw, 128)
    fin = 1 if eof_seen or raw[0] in _FIN_RECEIVED_STATES else 0
    return received - inq - fin


def _configure(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def tcp_stream_from_socket(sock: socket.socket) -> TcpStream:
    """Wrap a connected socket (e.g. one accepted by a capture listener)."""
    _configure(sock)
    loop = asyncio.get_running_loop()
    ep = TcpStream()
    transport, _ = await loop.connect_accepted_socket(lambda: ep.protocol, sock)
    transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
    return ep


def make_client_socket(
    dest: tuple[str, int], source: tuple[str, int] | None = None, transparent: bool = False
) -> socket.socket:
    """A non-blocking TCP socket like ztunnel's ``freebind_connect`` makes (ZT-PROXY, §4.2).

    ``transparent`` sets IP_TRANSPARENT + IP_FREEBIND so ``source`` may be a foreign (pod) IP.
    A source equal to the destination IP is not bound, as in ztunnel.
    """
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if transparent:
            level = socket.SOL_IP if family == socket.AF_INET else socket.SOL_IPV6
            sock.setsockopt(level, IP_TRANSPARENT if family == socket.AF_INET else 75, 1)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if source is not None and source[0] != dest[0]:
            sock.bind(source)
    except BaseException:
        sock.close()
        raise
    return sock


ACCEPT_BATCH = 128


def accept_backlog(lsock: socket.socket, limit: int = ACCEPT_BATCH) -> list[socket.socket]:
    """Whatever else is already waiting in a non-blocking listener's backlog (up to ``limit``).

    ``loop.sock_accept`` takes one connection per event-loop iteration; when 1000 clients
    connect at once and every iteration also relays data, the last ones wait seconds in the
    backlog (their TLS handshake clock already running on the other side). Accept loops call
    this after each ``sock_accept``, as libuv and Envoy accept in batches.
    """
    out: list[socket.socket] = []
    while len(out) < limit:
        try:
            sock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            break
        except (ConnectionAbortedError, ConnectionResetError):
            continue
        except OSError:
            break  # EMFILE & co: the caller's sock_accept reports it and backs off
        out.append(sock)
    return out


async def connect_socket(sock: socket.socket, dest: tuple[str, int], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, dest), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, f"connect to {dest[0]}:{dest[1]} timed out") from None
    except OSError as e:
        # without the frames below us: wait_for's frame holds the failed future, which holds
        # ``e``, so that traceback is a cycle pinning every caller's frame (streams, legs) too
        raise e.with_traceback(None) from None


async def tcp_connect(
    dest: tuple[str, int],
    *,
    source: tuple[str, int] | None = None,
    transparent: bool = False,
    sock: socket.socket | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
) -> TcpStream:
    """Connect plain TCP to ``dest`` (optionally from a spoofed ``source``) as a TcpStream."""
    own = sock is None
    if sock is None:
        sock = make_client_socket(dest, source, transparent)
    try:
        await connect_socket(sock, dest, timeout)
        return await tcp_stream_from_socket(sock)
    except BaseException:
        if own:
            sock.close()
        raise


# ================================================================================================
# relay
# ================================================================================================
@dataclass(frozen=True)
class RelayResult:
    """One proxied leg: bytes downstream->upstream, upstream->downstream, and how it ended."""

    bytes_up: int
    bytes_down: int
    outcome: str  # "ok" | "downstream_reset" | "upstream_reset"

    def __iter__(self):  # allows ``up, down, outcome = await relay(...)``
        return iter((self.bytes_up, self.bytes_down, self.outcome))


async def relay(downstream: Endpoint, upstream: Endpoint) -> RelayResult:
    """Splice two endpoints until both directions ended (FIN/END_STREAM) or one side reset.

    Data already buffered by a pull-API ``read`` caller is not lost: it is flushed first.
    A reset on either side is turned into a reset on the other. Both endpoints are closed on
    return.
    """
    up0 = downstream.bytes_received - downstream._buffered
    down0 = upstream.bytes_received - upstream._buffered
    downstream._attach(upstream)
    upstream._attach(downstream)
    if type(downstream) is TcpStream and type(upstream) is TcpStream:
        if downstream._go_direct(upstream):
            upstream._go_direct(downstream)
    try:
        pending = {downstream.done, upstream.done}
        while pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if downstream.reset_exc is not None or upstream.reset_exc is not None:
                break
    except asyncio.CancelledError:
        downstream.abort()
        upstream.abort()
        _unlink(downstream, upstream)
        raise
    if downstream.reset_exc is not None and downstream.reset_by_peer:
        outcome = OUTCOME_DOWNSTREAM_RESET
        upstream.abort()
    elif upstream.reset_exc is not None and upstream.reset_by_peer:
        outcome = OUTCOME_UPSTREAM_RESET
        downstream.abort()
    elif downstream.reset_exc is not None or upstream.reset_exc is not None:
        outcome = OUTCOME_DOWNSTREAM_RESET if downstream.reset_exc is not None else OUTCOME_UPSTREAM_RESET
        downstream.abort()
        upstream.abort()
    else:
        outcome = OUTCOME_OK
    for ep in (downstream, upstream):
        if type(ep) is TcpStream:
            ep._sync_direct()
    downstream.close()
    upstream.close()
    _unlink(downstream, upstream)
    return RelayResult(downstream.bytes_received - up0, upstream.bytes_received - down0, outcome)


def _unlink(*eps: Endpoint) -> None:
    """Undo ``_attach``: the two endpoints point at each other (sink/producer), a reference cycle
    that would keep both, and the connections under them (an HBONE stream holds its TLS
    transport), alive until the cyclic GC ran. Both are done here, so nothing flows any more."""
    for ep in eps:
        ep._sink = None
        ep._producer = None
