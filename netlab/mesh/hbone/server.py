"""The HBONE server: accept mTLS 1.3 + h2, answer CONNECTs, relay each accepted one (ZT-IN ``inbound.rs``).

ztunnel inbound :15008, a native-HBONE sidecar's :15008 and the waypoint's ``connect_terminate``
all run on :class:`HboneServer`; what differs is the handler that decides each CONNECT.

* The server cert is picked per accepted connection from its *local* (original destination)
  IP: ``cert_for(local_ip)``. ztunnel 1.18 fails the TLS accept for an unknown IP; the lab
  instead serves a default cert and answers every CONNECT on that connection with 404 (the
  status ztunnel gives for an unknown workload once TLS is up), which lets callers see *why*.
* The client may present any cert whose SAN is in the server's trust domain. **A mismatch is a
  refused connection, not a 401**: ztunnel 1.18 checks it in the BoringSSL verify callback, so
  the handshake fails and no HTTP is spoken; the lab checks right after the handshake and
  resets the connection before reading any HTTP/2 byte.
* Per CONNECT: non-CONNECT -> 404; ``:authority`` not ``ip:port`` -> 400; authority IP != the
  connection's local IP -> 400 (switch off for waypoints, ``check_authority=False``); unknown
  workload -> 404; then the handler returns a status (401/404/503) or an upstream
  :class:`~netlab.mesh.endpoint.Endpoint`; on success 200 and bytes are relayed with
  half-close and reset propagation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Self

from netlab.istio import HBONE_PORT, TRUST_DOMAIN
from netlab.mesh.endpoint import Endpoint
from netlab.mesh.hbone.connection import HboneConnection, HboneStream, Headers
from netlab.mesh.hbone.headers import (
    BAGGAGE_HEADER,
    FORWARDED_HEADER,
    TRACEPARENT_HEADER,
    parse_authority,
    parse_baggage,
    parse_forwarded_for,
)
from netlab.mesh.hbone.tls import (
    HANDSHAKE_AND_PREFACE_TIMEOUT_S,
    CaPaths,
    CertPair,
    server_context,
    spiffe_trust_domain,
)
from netlab.mesh.relay import OUTCOME_DOWNSTREAM_GONE, RelayResult, relay
from netlab.mesh.sockets import LISTEN_BACKLOG, Address, accept_forever, listener, set_nodelay

log = logging.getLogger("netlab.mesh.hbone")


@dataclass(frozen=True)
class ConnectRequest:
    """What an HBONE server handler sees for one CONNECT stream."""

    authority: str
    dest: Address | None  # parsed authority
    peer_identity: str | None  # first URI SAN of the client cert
    peer_addr: Address  # TCP source of the HBONE connection
    local_addr: Address  # TCP destination (the original destination under TPROXY)
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


HandlerResult = int | Endpoint
Handler = Callable[[ConnectRequest], Awaitable[HandlerResult]]
CertFor = Callable[[str], CertPair | None]
RelayDone = Callable[[ConnectRequest, RelayResult], None]


class HboneServer:
    """HBONE listener (ztunnel inbound :15008 / waypoint ``connect_terminate``).

    ``handler(req)`` returns an int status to reject with, or an upstream Endpoint (e.g. from
    :func:`netlab.mesh.relay.tcp_connect`) to relay to; OSError/TimeoutError from it -> 503.
    ``on_relay_done(req, result)`` is called once for every stream the handler gave an upstream
    for (one log line per leg): when the relay is over, or, if the client had gone while the
    handler connected (the upstream is then aborted), at once with outcome ``downstream_gone``.
    """

    def __init__(
        self,
        *,
        handler: Handler,
        cert_for: CertFor,
        default_cert: CertPair,
        ca: CaPaths,
        trust_domain: str = TRUST_DOMAIN,
        check_authority: bool = True,
        on_relay_done: RelayDone | None = None,
        handshake_timeout: float = HANDSHAKE_AND_PREFACE_TIMEOUT_S,
        non_connect_status: int = 404,
    ) -> None:
        self.handler = handler
        self.non_connect_status = non_connect_status  # 404 in ztunnel 1.18, 400 in 1.30 (inpod §3.5)
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
        self._tasks: set[asyncio.Future[Any]] = set()
        self._conns: set[HboneConnection] = set()
        self.stats = collections.Counter[str]()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(
        self, sock: socket.socket | None = None, host: str = "0.0.0.0", port: int = HBONE_PORT,
        backlog: int = LISTEN_BACKLOG,
    ) -> HboneServer:
        """Listen on ``sock`` (already bound+listening is fine, e.g. IP_TRANSPARENT) or host:port."""
        if sock is None:
            sock = listener(host, port, backlog=backlog)
            self._own_sock = True
        else:
            try:
                sock.listen(backlog)
            except OSError:
                pass
            sock.setblocking(False)
        self._lsock = sock
        self._accept_task = asyncio.get_running_loop().create_task(
            accept_forever(sock, self._serve_conn, self._spawn, "hbone"))
        return self

    @property
    def sockname(self) -> Address:
        assert self._lsock is not None
        name = self._lsock.getsockname()
        return name[0], name[1]

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # it was cancelled: nothing to report
                await self._accept_task
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

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- connections --------------------------------------------------------------------------
    def _check_peer(self, conn: HboneConnection) -> str | None:
        if not any(spiffe_trust_domain(i) == self.trust_domain for i in conn.peer_identities):
            return f"client identities {conn.peer_identities} not in trust domain {self.trust_domain}"
        return None

    async def _serve_conn(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout  # TLS handshake and HTTP/2 preface
        try:
            sock.setblocking(False)
            set_nodelay(sock)
            local_ip = sock.getsockname()[0]
            pair = self.cert_for(local_ip)
            known = pair is not None
            cert, key = pair if pair is not None else self.default_cert
            ctx = server_context(cert, key, self.ca)
        except Exception:
            log.exception("hbone: cannot set up TLS for an accepted connection")
            sock.close()
            return
        conn = HboneConnection(client_side=False, on_request=self._on_request, check=self._check_peer, context=ctx)
        conn.extra["known"] = known
        try:
            await loop.connect_accepted_socket(lambda: conn, sock)
        except OSError as e:
            log.info("hbone: accepted connection gone: %r", e)
            conn.release()  # connection_made/connection_lost will never come
            sock.close()
            return
        try:
            await conn.wait_handshake(max(0.0, deadline - loop.time()))
        except (ssl.SSLError, OSError, TimeoutError) as e:
            self.stats["tls_failed"] += 1
            log.info("hbone: TLS handshake failed: %r", e)
            e.with_traceback(None)  # a cycle through our frames otherwise (see hbone_connect)
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

    async def _preface_by(self, conn: HboneConnection, deadline: float) -> bool:
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

    def _on_request(self, conn: HboneConnection, stream: HboneStream, headers: Headers) -> None:
        self._spawn(self._serve_stream(conn, stream, headers))

    async def _serve_stream(self, conn: HboneConnection, stream: HboneStream, headers: Headers) -> None:
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        regular = tuple((k, v) for k, v in headers if not k.startswith(":"))
        authority = pseudo.get(":authority", "")
        dest = parse_authority(authority)
        req = ConnectRequest(
            authority=authority,
            dest=dest,
            peer_identity=conn.peer_identity,
            peer_addr=conn.peer_addr or ("", 0),
            local_addr=conn.local_addr or ("", 0),
            headers=regular,
            peer_identities=tuple(conn.peer_identities),
            stream=stream,
        )
        status = self._precheck(conn, pseudo.get(":method"), dest)
        upstream: Endpoint | None = None
        if status is None:
            try:
                result = await self.handler(req)
            except (OSError, TimeoutError) as e:
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
            stream.refused()
            return
        if stream.done.done():  # client gave up while we were connecting
            upstream.abort()
            res = RelayResult(0, 0, OUTCOME_DOWNSTREAM_GONE)
        else:
            conn.send_response(stream, 200)
            res = await relay(stream, upstream)
        if self.on_relay_done is not None:
            try:
                self.on_relay_done(req, res)
            except Exception:
                log.exception("hbone: on_relay_done failed")

    def _precheck(self, conn: HboneConnection, method: str | None, dest: Address | None) -> int | None:
        if method != "CONNECT":
            return self.non_connect_status
        if dest is None:
            return 400
        if self.check_authority:
            local_ip = conn.local_addr[0] if conn.local_addr else None
            if local_ip is None or ipaddress.ip_address(dest[0]) != ipaddress.ip_address(local_ip):
                return 400
        if not conn.extra.get("known", True):
            return 404
        return None
