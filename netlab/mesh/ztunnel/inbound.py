"""Inbound HBONE listener :15008 (ZT-IN ``inbound.rs``), on :class:`netlab.mesh.hbone.HboneServer`.

The server certificate is picked by the connection's local IP (the original destination pod's
identity; ztunnel's own for anything that is not a captured pod of this node). The server's
built-in authority/unknown-workload checks are switched off and done by :func:`route.plan_inbound`
instead, so every refusal (400/401/404) and upstream failure (503) gets its connection-log line.
"""

from __future__ import annotations

from pathlib import Path

from netlab.mesh.connlog import addr
from netlab.mesh.endpoint import Endpoint
from netlab.mesh.hbone import ConnectRequest, HboneServer
from netlab.mesh.relay import tcp_connect
from netlab.mesh.sockets import MakeSocket, client_socket
from netlab.mesh.ztunnel.config import LISTENER_INBOUND
from netlab.mesh.ztunnel.proxy import ProxyInputs
from netlab.mesh.ztunnel.route import InboundRoute, Reject, local_workload, plan_inbound


class Inbound:
    def __init__(self, pi: ProxyInputs) -> None:
        self.pi = pi
        self._default = pi.own_cert()
        self.server = HboneServer(handler=self.handle, cert_for=self.cert_for, default_cert=self._default,
                                  ca=pi.ca, trust_domain=pi.registry.trust_domain, check_authority=False,
                                  on_relay_done=pi.legs.relay_done)

    def cert_for(self, local_ip: str) -> tuple[Path, Path]:
        wl = local_workload(self.pi.registry, self.pi.cfg.node, local_ip)
        return self.pi.ctx.cert_for(wl.identity) if wl is not None else self._default

    async def handle(self, req: ConnectRequest) -> int | Endpoint:
        pi = self.pi
        d = plan_inbound(pi.registry, pi.cfg.node, req.local_addr[0], req.peer_addr[0], req.peer_identities,
                         req.dest, req.forwarded_for, authz=pi.authz)
        return await serve_inbound(pi, req, d)


async def serve_inbound(pi: ProxyInputs, req: ConnectRequest, d: InboundRoute | Reject, *,
                        make: MakeSocket | None = None, pod: str = "") -> int | Endpoint:
    """One CONNECT, decided (``d``): its leg, the refusal's status, or the app's end connected
    from ``d.source_ip`` (``make``: in-pod, the socket is made in the pod ``pod``)."""
    leg = pi.legs.start(LISTENER_INBOUND, req.peer_addr, req.authority, req.local_addr,
                        authority=req.authority, src_id=req.peer_identity or "")
    if pod:
        leg.extra["pod"] = pod
    if isinstance(d, Reject):
        leg.extra["reason"] = d.reason
        pi.legs.record(leg, str(d.status))
        return d.status or 400
    leg.dst_id = d.dst.identity
    leg.up_dst = addr(d.target)
    if d.from_waypoint:
        leg.extra["via_waypoint"] = True
    source, transparent = pi.spoof(d.source_ip)
    sock = client_socket(d.target, source, transparent, make=make) if make is not None else None
    try:
        up = await tcp_connect(d.target, source=source, transparent=transparent, sock=sock,
                               timeout=pi.cfg.connect_timeout)
    except (OSError, TimeoutError) as e:
        if sock is not None:
            sock.close()
        leg.extra["error"] = str(e)[:200]
        pi.legs.record(leg, "503")
        return 503
    return pi.legs.park(req, leg, up)
