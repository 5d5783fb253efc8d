"""One end of a byte stream, whatever carries it: what every proxy leg is made of.

Every proxy leg in the lab is "plain TCP on one side, an HBONE stream (or TCP) on the other".
Both kinds (:class:`netlab.mesh.relay.TcpStream`, :class:`netlab.mesh.hbone.HboneStream`)
implement :class:`Endpoint`, which offers two faces over one implementation:

* a *pull* API for simple callers (``await read()``, ``write()``, ``await drain()``,
  ``write_eof()``, ``close()``, ``abort()``);
* a *push* face used by :func:`netlab.mesh.relay.relay`: data callbacks go straight into the
  other endpoint's ``write`` with no task, queue or ``await`` per chunk, and back-pressure is a
  pause/resume pair (TCP: stop reading the socket; HBONE: stop returning HTTP/2 flow-control credit).

Semantics that the mesh relies on (RFC 9113 §8.5, ztunnel ``copy_hbone``):

* half-close is passed on: TCP FIN -> END_STREAM and END_STREAM -> ``shutdown(SHUT_WR)``;
* a reset is passed on as a reset, never as a clean end with missing bytes: TCP RST ->
  RST_STREAM(CONNECT_ERROR) and RST_STREAM -> TCP RST (``SO_LINGER`` 0 then close).
"""

from __future__ import annotations

import abc
import asyncio
import collections

from netlab.mesh import heaptrim
from netlab.mesh.sockets import Address

__all__ = ["READ_HIGH", "READ_LOW", "WRITE_HIGH", "WRITE_LOW", "Endpoint", "StreamReset"]

# Pull-mode receive buffer watermarks (TCP): pause the socket above HIGH, resume below LOW.
READ_HIGH = 4 * 1024 * 1024
READ_LOW = 1024 * 1024
# Write-side watermarks: above HIGH the producer feeding us is paused.
WRITE_HIGH = 4 * 1024 * 1024
WRITE_LOW = 1024 * 1024


class StreamReset(ConnectionResetError):
    """The peer reset the stream (TCP RST, RST_STREAM, or the HBONE connection died)."""


def _endpoint_counts() -> tuple[int, int]:
    return Endpoint.n_created, Endpoint.n_finished


class Endpoint(abc.ABC):
    """One end of a bidirectional byte stream; subclasses provide the transport hooks.

    What every endpoint carries, whatever the transport: ``local_addr`` and ``peer_addr`` (the
    TCP connection underneath: for HBONE the TLS connection's), ``peer_identity`` (the peer's
    SPIFFE ID when the transport authenticated one, else None), byte counts, and how it ended
    (``eof_received``/``eof_sent``, ``reset_exc``, ``done``). Proxies write these into their
    connection-log legs without knowing which transport they hold.

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
        heaptrim.watch(self._loop, _endpoint_counts)
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
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

    # ---- what the transport tells about itself ------------------------------------------------
    @property
    @abc.abstractmethod
    def local_addr(self) -> Address | None:
        """Our (ip, port) of the TCP connection underneath; None before it exists or once it is gone."""

    @property
    @abc.abstractmethod
    def peer_addr(self) -> Address | None:
        """The peer's (ip, port) of the TCP connection underneath; None before it exists or once it is gone."""

    @property
    def peer_identity(self) -> str | None:
        """The peer's authenticated identity (a SPIFFE ID), None where the transport has none."""
        return None

    # ---- hooks for subclasses ---------------------------------------------------------------
    @abc.abstractmethod
    def _t_write(self, data: bytes | bytearray | memoryview) -> None: ...
    @abc.abstractmethod
    def _t_write_eof(self) -> None: ...
    @abc.abstractmethod
    def _t_abort(self) -> None: ...
    @abc.abstractmethod
    def _t_close(self) -> None: ...
    @abc.abstractmethod
    def _t_pause(self) -> None: ...
    @abc.abstractmethod
    def _t_resume(self) -> None: ...
    def _t_consumed(self, n: int) -> None: pass  # noqa: B027 - a hook whose default does nothing

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
        if (exc is not None or not self.eof_received) and not self.done.done() and self.reset_exc is None:
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
            parts: list[bytes | memoryview] = []
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
        parts: list[bytes] = []
        got = 0
        while got < n:
            d = await self.read(n - got)
            if not d:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(d)
            got += len(d)
        return b"".join(parts)

    async def read_all(self) -> bytes:
        """Everything until EOF."""
        parts: list[bytes] = []
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
