"""TLS driven by hand on a plain TCP transport: ``ssl.SSLObject`` between two ``MemoryBIO``s.

Why not asyncio's TLS transport (``create_connection(ssl=...)``, uvloop's ``SSLProtocol``)?
Profiling both ztunnels on bench-datapath's path (c) (py-spy, 64-byte echo at 50 connections)
showed what it does per request: every ``transport.write`` is its own TLS record *and* its own
``send`` (a 9-byte DATA frame header, then the 64-byte payload: two records, two syscalls), and
every read allocates a 256 KiB buffer for ``SSLObject.read`` and shrinks it, i.e. ``mmap``,
``mremap`` and ``munmap`` per read (9 % of the samples). Here the frames of one turn are
gathered in one plaintext buffer, encrypted with one ``SSLObject.write`` (records filled to
16 KiB: :meth:`TlsProtocol._send_payload`) and sent with one ``transport.write``; reads are one
record at a time (at most 16 KiB, a heap allocation).

:class:`TlsProtocol` does the handshake (its outcome is the :attr:`~TlsProtocol.handshake`
future), decrypts what arrives and hands the plaintext to :meth:`~TlsProtocol._tls_plaintext`,
and encrypts what a subclass queued with :meth:`~TlsProtocol._send` / ``_send_payload`` when
:meth:`~TlsProtocol._kick` or the end of a receive flushes it. A close sends ``close_notify``;
an incoming ``close_notify`` is the end of the connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from netlab.mesh.sockets import Address, set_linger_zero

log = logging.getLogger("netlab.mesh.hbone")

#: TLS plaintext record size limit (RFC 8446 §5.1): OpenSSL cuts a write into records of this size.
RECORD = 16384
#: Decrypted bytes handed on together at most (:meth:`TlsProtocol._receive`).
BATCH = 256 * 1024
#: Encrypted bytes the TCP transport may hold before the protocol stops encrypting more.
TLS_WRITE_HIGH = 2 * 1024 * 1024
TLS_WRITE_LOW = 512 * 1024


class TlsProtocol(asyncio.Protocol):
    """One TLS connection over a plain asyncio TCP transport (see the module docstring).

    Subclass hooks: ``_tls_established()`` once the handshake is done (may ``abort``),
    ``_tls_plaintext(chunk)`` for decrypted bytes, ``_tls_writable()`` when the transport
    drained after a pause, ``_tls_lost(exc)`` when the TCP connection is gone.
    """

    def __init__(self, context: ssl.SSLContext, server_side: bool) -> None:
        self._context = context
        self._server_side = server_side
        self.transport: asyncio.Transport | None = None
        self.local_addr: Address | None = None
        self.peer_addr: Address | None = None
        self.lost = False  # the transport is gone (set before the subclass hears of it)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tls: ssl.SSLObject | None = None
        self._bio_in = ssl.MemoryBIO()
        self._bio_out = ssl.MemoryBIO()
        self._tls_read: Any = None  # the C object's read/write/pending: one Python frame less per call
        self._tls_write: Any = None
        self._tls_pending: Any = None
        # where decrypted bytes go: _tls_plaintext, or whatever a subclass puts here instead
        self._plaintext: Callable[[bytes], None] | None = self._tls_plaintext
        self._wbuf = bytearray()  # plaintext queued for the next flush
        self._receiving = False  # inside data_received: flush once at its end
        self._paused = False  # the transport's buffer is above TLS_WRITE_HIGH
        self._shut = False  # close_notify sent: nothing more may be written

    # ---- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        sockname, peername = t.get_extra_info("sockname"), t.get_extra_info("peername")
        self.local_addr = (sockname[0], sockname[1]) if sockname else None
        self.peer_addr = (peername[0], peername[1]) if peername else None
        t.set_write_buffer_limits(high=TLS_WRITE_HIGH, low=TLS_WRITE_LOW)
        try:
            tls = self._context.wrap_bio(self._bio_in, self._bio_out, server_side=self._server_side,
                                         server_hostname=None)
        except (ssl.SSLError, ValueError) as e:
            self._handshake_failed(e)
            return
        self._tls = tls
        inner = getattr(tls, "_sslobj", None)
        self._tls_read = inner.read if inner is not None else tls.read
        self._tls_write = inner.write if inner is not None else tls.write
        self._tls_pending = inner.pending if inner is not None else tls.pending
        self._handshake_step()

    def data_received(self, data: bytes) -> None:
        if self._tls is None:
            return
        self._bio_in.write(data)
        if self.handshake.done():
            self._receive()
        else:
            self._handshake_step()

    def eof_received(self) -> bool | None:
        return None  # TLS has no half-close: the transport closes, connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.handshake.done():
            self._fail_handshake_future(exc or ConnectionResetError("connection closed during the TLS handshake"))
        self._tls_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._tls_writable()

    # ---- hooks --------------------------------------------------------------------------------
    def _tls_established(self) -> None:
        pass

    def _tls_plaintext(self, chunk: bytes) -> None:
        pass

    def _plaintext_failed(self, e: Exception) -> None:
        """What the plaintext handler raised: the connection is over."""
        log.error("hbone: connection from %s: %r", self.peer_addr, e)
        self.abort()

    def _tls_writable(self) -> None:
        pass

    def _tls_lost(self, exc: Exception | None) -> None:
        pass

    # ---- handshake ----------------------------------------------------------------------------
    async def wait_handshake(self, timeout: float) -> None:
        """Until the handshake is done; raises its error (``ssl.SSLError``, ``ConnectionError``),
        or ``TimeoutError`` after ``timeout`` s (the connection is then reset)."""
        if not self.handshake.done():
            await asyncio.wait({self.handshake}, timeout=timeout)
        if not self.handshake.done():
            self.abort()
            raise TimeoutError(f"TLS handshake not done within {timeout:g} s")
        self.handshake.result()

    def _handshake_step(self) -> None:
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as e:
            self._flush()  # the alert that tells the peer why
            self._handshake_failed(e)
            return
        self._flush()
        self._tls_established()
        if not self.handshake.done():
            self.handshake.set_result(None)
        if self._bio_in.pending and not self.lost and self._tls is not None:
            self._receive()  # application data that came with the peer's last handshake flight

    def _handshake_failed(self, e: BaseException) -> None:
        self._fail_handshake_future(e)
        if self.transport is not None and not self.lost:
            self.transport.close()  # after the alert, if any

    def _fail_handshake_future(self, e: BaseException) -> None:
        if not self.handshake.done():
            # without its traceback: it runs through our frames, a cycle that would pin us
            self.handshake.set_exception(e.with_traceback(None))
            self.handshake.exception()  # retrieved: the waiter (if any) raises it

    # ---- receiving ----------------------------------------------------------------------------
    def _receive(self) -> None:
        """Decrypt what the BIO holds and hand it on, then flush once at the end.

        ``SSLObject.read`` returns one record (at most 16 KiB) per call. A turn's records go on
        together, joined, up to :data:`BATCH` bytes: a bulk stream's DATA then reaches its TCP
        sink in pieces of up to 256 KiB (one ``send`` each) instead of one per record. A turn of
        one record (a request) goes on as it is, without a copy.
        """
        read, pending, bio = self._tls_read, self._tls_pending, self._bio_in
        self._receiving = True
        try:
            while self._plaintext is not None and not self._shut and self._tls is not None:
                chunks: list[bytes] = []
                size = 0
                closed = False
                try:
                    while size < BATCH:
                        try:
                            chunk = read(RECORD)
                        except ssl.SSLWantReadError:
                            break
                        if not chunk:  # close_notify
                            closed = True
                            break
                        chunks.append(chunk)
                        size += len(chunk)
                        if not bio.pending and not pending():
                            break  # all read: no SSLWantReadError to raise and catch
                except ssl.SSLError as e:
                    log.info("hbone: TLS error from %s: %s", self.peer_addr, e)
                    self._receiving = False
                    self._tls_failed(e)
                    return
                if chunks:
                    try:
                        self._plaintext(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                    except Exception as e:  # noqa: BLE001 - whatever the handler raised ends this connection only
                        self._receiving = False
                        self._plaintext_failed(e)
                        break
                if closed:
                    self._tls_closed_by_peer()
                    break
                if size < BATCH:
                    break  # the BIO is drained
        finally:
            self._receiving = False
        self._flush()

    def _tls_closed_by_peer(self) -> None:
        self._shut = True
        if self.transport is not None and not self.lost:
            self.transport.close()

    def _tls_failed(self, e: BaseException) -> None:
        """Undecryptable input or an alert: the connection is over (reset)."""
        self._wbuf.clear()
        self.abort()

    # ---- sending ------------------------------------------------------------------------------
    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue plaintext (small: copied) for the next flush."""
        self._wbuf += data

    def _send_payload(self, header: bytes, payload: bytes | bytearray | memoryview) -> None:
        """Queue ``header`` + ``payload``, encrypting at once whatever fills whole records.

        A small payload is copied behind the header. A large one completes the record being
        filled with its head, goes to OpenSSL without a copy for as many whole records as it
        holds, and leaves its tail queued: every record but the last of a flush carries
        16 KiB, and no reference to ``payload`` is kept (the caller may reuse its buffer).
        """
        wbuf = self._wbuf
        wbuf += header
        n = len(payload)
        if n < RECORD or self._tls_write is None or self._shut:
            wbuf += payload
            return
        mv = memoryview(payload)
        fill = -len(wbuf) % RECORD
        wbuf += mv[:fill]
        self._tls_write(wbuf)
        wbuf.clear()
        whole = fill + (n - fill) // RECORD * RECORD
        if whole > fill:
            self._tls_write(mv[fill:whole])
        wbuf += mv[whole:]

    def _send_now(self, data: bytes) -> None:
        """Encrypt and send ``data`` (small plaintext) at once: the relay's per-chunk path."""
        if self._wbuf or self._receiving or self._shut or self._tls_write is None:
            self._wbuf += data
            self._kick()
            return
        self._tls_write(data)
        t = self.transport
        if t is not None and not self.lost:
            t.write(self._bio_out.read())

    def _kick(self) -> None:
        """Flush now, unless a receive is running (it flushes once when it is done)."""
        if not self._receiving:
            self._flush()

    def _flush(self) -> None:
        """Encrypt the queued plaintext and hand every encrypted byte to the transport."""
        wbuf = self._wbuf
        if wbuf:
            if self._tls_write is not None and not self._shut:
                try:
                    self._tls_write(wbuf)
                except ssl.SSLError as e:
                    log.info("hbone: TLS write to %s failed: %s", self.peer_addr, e)
            wbuf.clear()
        bio = self._bio_out
        if bio.pending:
            data = bio.read()
            t = self.transport
            if t is not None and not self.lost:
                t.write(data)

    # ---- ending -------------------------------------------------------------------------------
    def close_tls(self) -> None:
        """Flush, send close_notify, close the TCP connection once the buffer is written."""
        t = self.transport
        if t is None or self.lost:
            return
        self._flush()
        if self._tls is not None and self.handshake.done() and not self._shut:
            self._shut = True
            try:
                self._tls.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # SSLWantReadError: the peer's close_notify is not awaited
            self._flush()
        t.close()

    def abort(self) -> None:
        """Drop the connection with a TCP RST, saying nothing more."""
        t = self.transport
        if t is not None and not self.lost:
            set_linger_zero(t.get_extra_info("socket"))
            t.abort()

    def release(self) -> None:
        """Let go of the transport and the TLS state once the connection is gone (or never was)."""
        self.transport = None
        self._tls = None
        self._tls_read = self._tls_write = self._tls_pending = None
        self._plaintext = None  # a bound method of ours (or of a subclass's reader): a cycle
        self._wbuf = bytearray()
