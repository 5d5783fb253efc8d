"""What the sidecar's listeners share, and only the sidecar: Envoy's choices the lab wants to show.

Envoy and ztunnel differ in small ways (SAN matching by trust-domain prefix, the 127.0.0.6
inbound bind, REDIRECT instead of TPROXY), so these helpers encode the sidecar's side only.
What every proxy shares (process set-up, readiness, accept loop, recording legs) is in
:mod:`netlab.mesh.process`, :mod:`netlab.mesh.sockets` and :mod:`netlab.mesh.legs`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from netlab import istio
from netlab.mesh.connlog import Leg, addr
from netlab.mesh.legs import LegRecorder
from netlab.mesh.relay import TcpStream, tcp_stream_from_socket
from netlab.mesh.sockets import Address, original_dst

log = logging.getLogger(__name__)


class TrustDomainSans(Sequence[str]):
    """Server-SAN matcher for ``hbone_connect(expected_identity=...)``: any SPIFFE ID in the trust domain.

    Envoy's ``connect_originate`` cluster matches the upstream SAN on the prefix
    ``spiffe://<td>/`` (§5.2), not one exact identity. ``hbone_connect`` checks
    ``identity in expected`` *during* the TLS setup, before any CONNECT is sent, so a container
    whose ``__contains__`` is a prefix test reproduces Envoy's check at the right moment (a
    wrong-domain server fails like a TLS error, never sees a request).
    """

    def __init__(self, trust_domain: str = istio.TRUST_DOMAIN) -> None:
        self.prefix = f"spiffe://{trust_domain}/"

    def __contains__(self, identity: object) -> bool:
        return isinstance(identity, str) and identity.startswith(self.prefix) and len(identity) > len(self.prefix)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> str:  # type: ignore[override]  # one pattern; slices make no sense
        if i != 0:
            raise IndexError(i)
        return self.prefix + "*"

    def __iter__(self) -> Iterator[str]:
        yield self.prefix + "*"

    def __repr__(self) -> str:
        return f"TrustDomainSans({self.prefix}*)"


class RedirectListener:
    """A sidecar listener fed by istio-iptables REDIRECT: read the original destination off the
    conntrack entry (SO_ORIGINAL_DST), then hand the socket to ``serve``."""

    listener = ""

    def __init__(self, legs: LegRecorder) -> None:
        self.legs = legs

    async def on_accept(self, sock: socket.socket) -> None:
        try:
            orig = original_dst(sock)
        except OSError as e:  # the socket already died
            log.info("%s: no original destination: %s", self.listener, e)
            sock.close()
            return
        await self.serve(sock, orig)

    async def serve(self, sock: socket.socket, orig: Address) -> None:
        raise NotImplementedError

    async def accepted(self, sock: socket.socket, orig: Address, **fields: Any) -> tuple[Leg, TcpStream | None]:
        """The leg of a connection this listener accepted, and its stream. The stream is None
        (the socket closed, the leg recorded as an error) when the socket was gone before we got it."""
        try:
            peer, local = sock.getpeername(), sock.getsockname()
        except OSError:
            peer = local = None
        leg = self.legs.start(self.listener, peer, addr(orig), local, **fields)
        try:
            return leg, await tcp_stream_from_socket(sock)
        except OSError as e:
            sock.close()
            self.legs.record(leg, f"error:{e}")
            return leg, None
