"""The HBONE client: TCP (from a spoofed source if asked) -> mTLS 1.3 + h2 -> one CONNECT (ZT-OUT ``outbound.rs``).

The client wants the server's URI SAN to be the expected identity, checked right after the
handshake, before any HTTP/2 byte (Python's ``ssl`` has no verify callback; ztunnel's BoringSSL
checks inside the handshake, so the failure looks the same to both: a dead connection,
:class:`HboneTlsError`). ztunnel 1.18 sends exactly one CONNECT per connection and hangs up
when its stream is over.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence

from netlab.istio import CONNECT_TIMEOUT_S
from netlab.mesh.endpoint import StreamReset
from netlab.mesh.hbone.connection import HboneConnection, HboneStream
from netlab.mesh.hbone.tls import TLS_HANDSHAKE_TIMEOUT_S, CaPaths, PathLike, client_context
from netlab.mesh.sockets import Address, client_socket, connect_socket, set_nodelay


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


HeadersArg = Mapping[str, str] | Iterable[tuple[str, str]] | None


def _header_list(headers: HeadersArg) -> list[tuple[str, str]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k.lower(), v) for k, v in items]


async def hbone_connect(
    addr: Address,
    authority: str,
    *,
    client_cert: PathLike,
    client_key: PathLike,
    ca: CaPaths,
    expected_identity: str | Sequence[str] | None,
    headers: HeadersArg = None,
    source: Address | None = None,
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
        sock = client_socket(addr, source, transparent)
    try:
        try:
            await connect_socket(sock, addr, timeout)
        except OSError as e:
            raise HboneError(None, f"connect {addr[0]}:{addr[1]}: {e}") from e
        set_nodelay(sock)
        ctx = client_context(client_cert, client_key, ca)
        wanted = [expected_identity] if isinstance(expected_identity, str) else expected_identity

        def check(conn: HboneConnection) -> str | None:
            if wanted is not None and not any(i in wanted for i in conn.peer_identities):
                return f"server identity {conn.peer_identities} != expected {list(wanted)}"
            return None

        conn = HboneConnection(client_side=True, check=check, context=ctx)
        try:
            await loop.create_connection(lambda: conn, sock=sock)
            await conn.wait_handshake(tls_timeout)
        except (TimeoutError, ssl.SSLError, OSError) as e:
            if conn.transport is None:
                conn.release()  # connection_made/connection_lost will never come
            elif not conn.transport.is_closing():
                conn.abort()  # (a failed handshake closes it after its alert); connection_lost releases it
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
                name = sock.getsockname()
                e.local_addr = (name[0], name[1])
            except OSError:
                pass
        conn.close()
        raise


async def _open_stream(
    conn: HboneConnection, authority: str, headers: HeadersArg, timeout: float, method: str = "CONNECT", peer: str = ""
) -> HboneStream:
    """Send one request on an established connection and wait for its response.

    ztunnel 1.18 sends exactly one CONNECT per connection (what :func:`hbone_connect` does);
    this is separate so tests can open more streams on one connection (the server supports it).
    """
    hdrs = [(":method", method), (":authority", authority)]
    if method != "CONNECT":
        hdrs += [(":scheme", "https"), (":path", "/")]
    hdrs += _header_list(headers)
    if conn.lost:
        raise HboneTlsError(f"connection to {peer} closed before a request")
    try:
        stream = conn.send_request(hdrs)
        try:
            resp = await asyncio.wait_for(asyncio.shield(stream.response), timeout)
        except (StreamReset, ConnectionError) as e:
            raise HboneTlsError(f"connection to {peer} closed before a response: {e}") from e
        except TimeoutError:
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
        stream.refused()
        raise HboneError(stream.status, f"from {peer} for {authority}")
    return stream
