"""Inbound plaintext listener :15006 (ZT-PT ``inbound_passthrough.rs``).

A non-mesh client's TCP to a captured pod arrives here through pistioin (dport != 15008). The
pod gets the connection from the client's own IP; a pod behind a waypoint gets it through the
waypoint instead (hairpin: HBONE from ztunnel's own IP) so its L7 policy is not bypassed.
"""

from __future__ import annotations

from netlab.mesh.relay import TcpStream
from netlab.mesh.sockets import Address
from netlab.mesh.ztunnel.config import LISTENER_PLAINTEXT
from netlab.mesh.ztunnel.proxy import ProxyInputs, serve_captured
from netlab.mesh.ztunnel.route import Decision, plan_plaintext


async def handle(pi: ProxyInputs, down: TcpStream) -> None:
    def decide(peer_ip: str, orig_dst: Address) -> Decision:
        return plan_plaintext(pi.registry, pi.cfg.node, pi.cfg.own_ip, peer_ip, orig_dst,
                              hbone_port=pi.cfg.hbone_port, authz=pi.authz)

    await serve_captured(pi, down, LISTENER_PLAINTEXT, decide)
