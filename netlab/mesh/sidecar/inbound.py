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

import asyncio
import logging
import socket

from netlab import istio
from netlab.mesh.connlog import ConnLog, Leg, addr
from netlab.mesh.hbone import CertPair, ConnectRequest, HboneServer
from netlab.mesh.registry import Registry, Workload
from netlab.mesh.relay import Endpoint, RelayResult, relay, tcp_connect
from netlab.mesh.sidecar.base import RedirectListener, open_redirected, finish_parked_leg, watch_orphan

log = logging.getLogger(__name__)

INBOUND_BIND_IP = "127.0.0.6"  # Envoy's inbound upstream bind (listener_address.go L36)
INBOUND_CONNECT_TIMEOUT_S = istio.CONNECT_TIMEOUT_S
# ports that must never be proxied to the app (they are the proxy's own)
PROXY_PORTS = (istio.SIDECAR_OUTBOUND_PORT, istio.SIDECAR_INBOUND_PORT, istio.HBONE_PORT)


async def connect_app(dest: tuple[str, int], bind_ip: str = INBOUND_BIND_IP) -> Endpoint:
    """Envoy ``inbound|<port>||`` cluster: connect to the app from ``127.0.0.6``."""
    return await tcp_connect(dest, source=(bind_ip, 0), timeout=INBOUND_CONNECT_TIMEOUT_S)


class Inbound(RedirectListener):
    """Plaintext inbound (15006) connections; one ConnLog line each."""

    def __init__(self, *, me: Workload, conn_log: ConnLog, component: str,
                 listener_port: int = istio.SIDECAR_INBOUND_PORT, bind_ip: str = INBOUND_BIND_IP) -> None:
        self.me = me
        self.conn_log = conn_log
        self.component = component
        self.listener = f"inbound:{listener_port}"
        self.bind_ip = bind_ip

    async def serve(self, sock: socket.socket, orig: tuple[str, int]) -> None:
        leg, down = await open_redirected(sock, orig, self.component, self.listener, self.conn_log,
                                          dst_id=self.me.identity)
        if down is None:
            return
        if orig[1] in PROXY_PORTS:  # Envoy's virtualInbound blackholes its own ports
            down.abort()
            self.conn_log.write(leg.finish("blackhole"))
            return
        leg.up_dst = addr(orig)
        try:
            up = await connect_app(orig, self.bind_ip)
        except (OSError, asyncio.TimeoutError) as e:
            down.abort()
            self.conn_log.write(leg.finish("refused" if isinstance(e, ConnectionRefusedError) else f"error:{e}"))
            return
        leg.up_src = addr(up.local_addr)  # type: ignore[attr-defined]
        res = await relay(down, up)
        leg.bytes_up, leg.bytes_down = res.bytes_up, res.bytes_down
        if res.outcome != "ok":
            leg.extra["reset"] = res.outcome
        self.conn_log.write(leg.finish("ok" if res.outcome == "ok" else "reset"))


class HboneInbound:
    """``connect_terminate`` on 15008 for a native-HBONE sidecar."""

    def __init__(self, *, reg: Registry, me: Workload, cert: CertPair, ca: str, conn_log: ConnLog, component: str,
                 listener_port: int = istio.HBONE_PORT, bind_ip: str = INBOUND_BIND_IP) -> None:
        self.reg = reg
        self.me = me
        self.cert = cert
        self.conn_log = conn_log
        self.component = component
        self.listener = f"inbound:{listener_port}"
        self.bind_ip = bind_ip
        self._legs: dict[object, Leg] = {}  # keyed by the HboneStream (identity)
        self.server = HboneServer(handler=self.handle, cert_for=self.cert_for, default_cert=cert, ca=ca,
                                  trust_domain=reg.trust_domain, check_authority=True, on_relay_done=self.done)

    def cert_for(self, local_ip: str) -> CertPair | None:
        return self.cert if local_ip == self.me.ip else None

    async def handle(self, req: ConnectRequest) -> Endpoint | int:
        assert req.dest is not None  # HboneServer answers 400 before calling us otherwise
        leg = Leg(component=self.component, listener=self.listener, src=addr(req.peer_addr),
                  orig_dst=req.authority, local=addr(req.local_addr), authority=req.authority,
                  src_id=req.peer_identity or "", dst_id=self.me.identity, up_dst=addr(req.dest))
        if req.dest[1] in PROXY_PORTS:
            self.conn_log.write(leg.finish("blackhole"))
            return 503
        try:
            up = await connect_app(req.dest, self.bind_ip)
        except (OSError, asyncio.TimeoutError) as e:
            self.conn_log.write(leg.finish("503"))
            log.info("hbone inbound: app %s: %s", leg.up_dst, e)
            return 503
        leg.up_src = addr(up.local_addr)  # type: ignore[attr-defined]
        if req.stream is not None:
            self._legs[req.stream] = leg
            watch_orphan(req, self._legs, self.conn_log)
        return up

    def done(self, req: ConnectRequest, res: RelayResult) -> None:
        finish_parked_leg(self._legs, self.conn_log, req, res)
