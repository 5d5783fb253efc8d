"""The sidecar's outbound side: ``virtualOutbound`` on 15001 (reference §5.2, §6).

The app's connection was REDIRECTed to 15001 by ``ISTIO_OUTPUT``; ``SO_ORIGINAL_DST`` gives
where the app meant to go. Envoy then picks an endpoint from EDS. With the lab's ambient
profile (``PILOT_ENABLE_HBONE`` + ``ISTIO_META_ENABLE_HBONE``) EDS rewrites every endpoint that
supports a tunnel into an internal ``connect_originate`` address, so:

* tunnel-capable endpoint (ambient pod, waypoint, sidecar labelled ``tunnel=http``): HBONE to
  ``<tunnel IP>:15008`` where the tunnel IP is the endpoint's first waypoint if it has one, else
  the endpoint itself; ``:authority`` is always ``<endpoint pod IP>:<target port>`` (the sidecar
  resolved the VIP itself, unlike ztunnel which sends the VIP to the waypoint);
* any other endpoint: plain TCP to ``<endpoint IP>:<target port>``;
* unknown destination: ``PassthroughCluster`` (plain TCP to the original destination);
* a known service without endpoints: reset (Envoy's "no healthy upstream").

The sidecar runs as uid 1337, so its own upstream sockets are exempt from capture (§6) and it
never needs to bind or spoof a source: the kernel picks the pod IP.

Istio 1.30.3 (the in-pod datapath; inpod reference §4.3-§4.4) differs in two ways: **sidecars
ignore waypoints** (#50363: EDS "intentionally does not take into account waypoints"), so the
tunnel always goes to ``<endpoint pod IP>:15008``; and an endpoint that is itself a sidecar pod
(``TLSMode istio``) stays on classic mTLS (plain TCP in the lab) even when it carries the tunnel
label, since ``PILOT_PREFER_SENDING_HBONE`` is off. No ``baggage`` header either
(``AMBIENT_ENABLE_BAGGAGE`` off).
"""

from __future__ import annotations

import logging
import random
import socket
from dataclasses import dataclass
from typing import Literal

from netlab import istio
from netlab.mesh.connlog import addr
from netlab.mesh.endpoint import Endpoint
from netlab.mesh.envoy import connect_originate, failure_outcome
from netlab.mesh.hbone import HboneError, baggage_header, format_authority
from netlab.mesh.legs import LegRecorder, LegWriter
from netlab.mesh.registry import Registry, Workload
from netlab.mesh.relay import tcp_connect
from netlab.mesh.sidecar.base import RedirectListener, TrustDomainSans
from netlab.mesh.sockets import Address

log = logging.getLogger(__name__)

RouteKind = Literal["hbone", "tcp", "passthrough", "no_endpoint", "blackhole"]
# Envoy's outbound cluster default (connect_originate has its own: netlab.mesh.envoy)
TCP_CONNECT_TIMEOUT_S = istio.CONNECT_TIMEOUT_S
# Ports of the proxy itself: a connection "to" them would loop straight back into us.
PROXY_PORTS = (istio.SIDECAR_OUTBOUND_PORT, istio.SIDECAR_INBOUND_PORT)


@dataclass(frozen=True)
class OutboundRoute:
    """Where one captured connection goes. ``target`` is the TCP address we connect to."""

    kind: RouteKind
    target: Address | None
    endpoint: Workload | None = None
    authority: str = ""  # HBONE :authority (endpoint pod IP:target port)
    via_waypoint: Workload | None = None

    @property
    def expected_identity_hint(self) -> str:
        """The identity the server *should* present (for the log; the check itself is a prefix)."""
        if self.via_waypoint is not None:
            return self.via_waypoint.identity
        return self.endpoint.identity if self.endpoint is not None else ""


def route_outbound(reg: Registry, orig: Address, *, hbone_port: int = istio.HBONE_PORT,
                   rng: random.Random | None = None) -> OutboundRoute:
    """EDS + the §5.2 rewrite as a pure function of the registry and the original destination."""
    ip, port = orig
    svc = reg.service(ip, port)
    res = reg.resolve(ip, port, rng)
    if res is None:
        if svc is not None:
            return OutboundRoute("no_endpoint", None)
        return OutboundRoute("passthrough", orig)
    wl, target_port = res
    if reg.inpod:
        if wl.protocol == "HBONE" and wl.mode in ("ambient", "waypoint"):
            return OutboundRoute("hbone", (wl.ip, hbone_port), endpoint=wl, authority=format_authority(wl.ip, target_port))
        return OutboundRoute("tcp", (wl.ip, target_port), endpoint=wl)
    if wl.protocol == "HBONE":
        wp = reg.waypoint_of(wl)
        tunnel_ip = wp.ip if wp is not None else wl.ip
        return OutboundRoute("hbone", (tunnel_ip, hbone_port), endpoint=wl,
                             authority=format_authority(wl.ip, target_port), via_waypoint=wp)
    return OutboundRoute("tcp", (wl.ip, target_port), endpoint=wl)


class Outbound(RedirectListener):
    """Handles connections accepted on 15001; one leg per connection."""

    def __init__(self, *, reg: Registry, me: Workload, cert: tuple[str, str], ca: str, conn_log: LegWriter,
                 component: str, baggage: str | None = None, hbone_port: int = istio.HBONE_PORT,
                 listener_port: int = istio.SIDECAR_OUTBOUND_PORT, rng: random.Random | None = None) -> None:
        super().__init__(LegRecorder(component, conn_log))
        self.reg = reg
        self.me = me
        self.cert = cert
        self.ca = ca
        self.component = component
        self.baggage = baggage if baggage is not None else default_baggage(me)
        self.hbone_port = hbone_port
        self.listener = f"outbound:{listener_port}"
        self.rng = rng
        self.sans = TrustDomainSans(reg.trust_domain)

    async def serve(self, sock: socket.socket, orig: Address) -> None:
        """Proxy one downstream connection whose original destination is ``orig``."""
        leg, down = await self.accepted(sock, orig, src_id=self.me.identity)
        if down is None:
            return
        # Envoy's tcp_proxy reads nothing from the downstream until the upstream is connected;
        # reading on meanwhile held up to READ_HIGH per connection in this process (1000 new
        # connections x 1 MiB waiting for handshakes = 1 GiB of RSS)
        down.pause_reading("connect")
        route = route_outbound(self.reg, orig, hbone_port=self.hbone_port, rng=self.rng)
        leg.extra["route"] = route.kind
        if route.via_waypoint is not None:
            leg.extra["waypoint"] = route.via_waypoint.ref
        if route.target is None or (orig[1] in PROXY_PORTS and orig[0] == self.me.ip):
            down.abort()  # no healthy upstream / would loop into ourselves: reset, like Envoy
            self.legs.record(leg, "no_healthy_upstream" if route.kind == "no_endpoint" else "blackhole")
            return
        leg.up_dst = addr(route.target)
        up: Endpoint
        try:
            if route.kind == "hbone":
                leg.proto, leg.authority = "hbone", route.authority
                up = await connect_originate(leg, route.target, route.authority, cert=self.cert, ca=self.ca,
                                             expected_identity=self.sans,
                                             headers=None if self.reg.inpod else {"baggage": self.baggage})
                leg.dst_id = up.peer_identity or ""
            else:
                up = await tcp_connect(route.target, timeout=TCP_CONNECT_TIMEOUT_S)
                leg.dst_id = route.endpoint.identity if route.endpoint is not None else ""
        except (HboneError, OSError, TimeoutError) as e:
            down.abort()
            self.legs.record(leg, failure_outcome(e))
            return
        down.resume_reading("connect")
        await self.legs.relay(leg, down, up)


def default_baggage(me: Workload, version: str = "latest") -> str:
    """Envoy's sidecar ``baggage``: like ztunnel's, but the workload type is always ``deployment``."""
    return baggage_header(namespace=me.namespace, workload_name=me.name, service_name=me.app or me.name,
                          service_version=version, workload_type="deployment")
