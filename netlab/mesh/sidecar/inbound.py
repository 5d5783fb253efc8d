"""The sidecar's inbound side: ``virtualInbound`` on 15006 and, with HBONE on, ``connect_terminate`` on 15008.

15006 (§6): ``ISTIO_INBOUND`` REDIRECTs every inbound TCP connection except 15008/15090/15021/
15020 here; ``SO_ORIGINAL_DST`` gives ``<pod IP>:<port>``. Envoy's inbound clusters connect to
the app with the upstream bind address ``127.0.0.6``, so the app sees 127.0.0.6 as the client,
and ``ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN`` keeps that connection from being captured
again.

15008 (§5.2 "Sidecar HBONE inbound"): only for a sidecar labelled
``networking.istio.io/tunnel=http`` (``native_hbone``). mTLS 1.3 + h2 CONNECT with this pod's
certificate; the CONNECT goes to the same per-port inbound chains, so the app again sees
127.0.0.6. ``istio-iptables`` never captures 15008, so callers reach it directly.
"""

from __future__ import annotations

import logging
import socket

from netlab import istio
from netlab.mesh.connlog import Leg, addr
from netlab.mesh.endpoint import Endpoint
from netlab.mesh.hbone import CertPair, ConnectRequest, HboneServer
from netlab.mesh.legs import LegRecorder, LegWriter
from netlab.mesh.registry import Registry, Workload
from netlab.mesh.relay import tcp_connect
from netlab.mesh.sidecar.base import RedirectListener
from netlab.mesh.sockets import Address

log = logging.getLogger(__name__)

INBOUND_BIND_IP = "127.0.0.6"  # Envoy's inbound upstream bind (listener_address.go L36)
INBOUND_CONNECT_TIMEOUT_S = istio.CONNECT_TIMEOUT_S
# ports that must never be proxied to the app (they are the proxy's own)
PROXY_PORTS = (istio.SIDECAR_OUTBOUND_PORT, istio.SIDECAR_INBOUND_PORT, istio.HBONE_PORT)


async def connect_app(dest: Address, bind_ip: str = INBOUND_BIND_IP) -> Endpoint:
    """Envoy ``inbound|<port>||`` cluster: connect to the app from ``127.0.0.6``."""
    return await tcp_connect(dest, source=(bind_ip, 0), timeout=INBOUND_CONNECT_TIMEOUT_S)


async def app_upstream(leg: Leg, dest: Address, bind_ip: str) -> Endpoint | str:
    """The app's end of an inbound leg, or the outcome to record instead: ``blackhole`` (Envoy's
    virtualInbound drops connections to the proxy's own ports), ``refused`` or ``error:...``."""
    if dest[1] in PROXY_PORTS:
        return "blackhole"
    leg.up_dst = addr(dest)
    try:
        up = await connect_app(dest, bind_ip)
    except (OSError, TimeoutError) as e:
        log.info("%s: app %s: %s", leg.listener, leg.up_dst, e)
        return "refused" if isinstance(e, ConnectionRefusedError) else f"error:{e}"
    return up


class Inbound(RedirectListener):
    """Plaintext inbound (15006) connections; one leg each."""

    def __init__(self, *, me: Workload, conn_log: LegWriter, component: str,
                 listener_port: int = istio.SIDECAR_INBOUND_PORT, bind_ip: str = INBOUND_BIND_IP) -> None:
        super().__init__(LegRecorder(component, conn_log))
        self.me = me
        self.component = component
        self.listener = f"inbound:{listener_port}"
        self.bind_ip = bind_ip

    async def serve(self, sock: socket.socket, orig: Address) -> None:
        leg, down = await self.accepted(sock, orig, dst_id=self.me.identity)
        if down is None:
            return
        up = await app_upstream(leg, orig, self.bind_ip)
        if isinstance(up, str):
            down.abort()
            self.legs.record(leg, up)
            return
        await self.legs.relay(leg, down, up)


class HboneInbound:
    """``connect_terminate`` on 15008 for a native-HBONE sidecar."""

    def __init__(self, *, reg: Registry, me: Workload, cert: CertPair, ca: str, conn_log: LegWriter,
                 component: str, listener_port: int = istio.HBONE_PORT, bind_ip: str = INBOUND_BIND_IP) -> None:
        self.reg = reg
        self.me = me
        self.cert = cert
        self.legs = LegRecorder(component, conn_log)
        self.component = component
        self.listener = f"inbound:{listener_port}"
        self.bind_ip = bind_ip
        self.server = HboneServer(handler=self.handle, cert_for=self.cert_for, default_cert=cert, ca=ca,
                                  trust_domain=reg.trust_domain, check_authority=True,
                                  on_relay_done=self.legs.relay_done)

    def cert_for(self, local_ip: str) -> CertPair | None:
        return self.cert if local_ip == self.me.ip else None

    async def handle(self, req: ConnectRequest) -> Endpoint | int:
        assert req.dest is not None  # HboneServer answers 400 before calling us otherwise
        leg = self.legs.start(self.listener, req.peer_addr, req.authority, req.local_addr, authority=req.authority,
                              src_id=req.peer_identity or "", dst_id=self.me.identity, up_dst=addr(req.dest))
        up = await app_upstream(leg, req.dest, self.bind_ip)
        if isinstance(up, str):
            self.legs.record(leg, "blackhole" if up == "blackhole" else "503")
            return 503
        return self.legs.park(req, leg, up)
