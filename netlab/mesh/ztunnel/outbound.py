"""Outbound listener :15001 (ZT-OUT ``outbound.rs``): TCP of captured pods on this node.

TPROXY delivers the pod's connection here; the accepted socket's local address is the original
destination (§4.2). The decision is :func:`route.plan_outbound` (waypoint / HBONE / same-node
fast path / plain TCP / passthrough); bytes go through :func:`relay.relay`.
"""

from __future__ import annotations

from netlab.mesh.relay import TcpStream
from netlab.mesh.sockets import Address
from netlab.mesh.ztunnel.config import LISTENER_OUTBOUND
from netlab.mesh.ztunnel.proxy import ProxyInputs, serve_captured
from netlab.mesh.ztunnel.route import Decision, plan_outbound


async def handle(pi: ProxyInputs, down: TcpStream) -> None:
    def decide(peer_ip: str, orig_dst: Address) -> Decision:
        return plan_outbound(pi.registry, pi.cfg.node, pi.cfg.own_ip, peer_ip, orig_dst,
                             hbone_port=pi.cfg.hbone_port, authz=pi.authz, rng=pi.rng)

    await serve_captured(pi, down, LISTENER_OUTBOUND, decide)
