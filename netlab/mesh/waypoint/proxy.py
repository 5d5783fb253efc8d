"""The waypoint's datapath (reference §7): terminate HBONE, pick the endpoint, originate a new HBONE.

``connect_terminate`` on 15008 accepts every CONNECT with the waypoint's own certificate (callers
dial the waypoint's pod IP, but the authority names the *final* destination, so the
authority-equals-local-IP check ztunnel makes is off: ``check_authority=False``). Then, as
``main_internal`` does:

* authority = service VIP:port -> an endpoint of that service *in the waypoint's scope* (its
  namespace, and its service account if the Gateway is SA-scoped), servicePort -> targetPort;
* authority = workload pod IP:port -> that pod, same port (the ``direct-tcp`` chain); pods out
  of scope have no filter chain in Envoy: we answer 401 (the lab's choice, visible in the log).

Either way ``connect_originate`` opens a **new** HBONE connection to ``<endpoint IP>:15008``
with ``:authority <endpoint IP>:<port>``, from the waypoint's own IP, with the waypoint's client
certificate and **no** baggage/forwarded header, so the destination ztunnel sees the waypoint as
the source. The server must present the destination workload's identity.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any

from netlab import istio
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.connlog import ConnLog, addr
from netlab.mesh.endpoint import Endpoint
from netlab.mesh.envoy import connect_originate, failure_outcome
from netlab.mesh.hbone import CertPair, ConnectRequest, HboneError, HboneServer, format_authority
from netlab.mesh.legs import LegRecorder, LegWriter
from netlab.mesh.process import serve_readiness
from netlab.mesh.registry import Registry, Workload

log = logging.getLogger(__name__)

LISTENER = f"inbound:{istio.HBONE_PORT}"


@dataclass(frozen=True)
class WaypointTarget:
    """Where one CONNECT goes next: an endpoint pod and the port the app listens on."""

    endpoint: Workload
    port: int
    via: str  # "vip" | "pod"

    @property
    def authority(self) -> str:
        return format_authority(self.endpoint.ip, self.port)


class Waypoint:
    """One waypoint pod: handler and bookkeeping for its :class:`HboneServer`."""

    def __init__(self, *, reg: Registry, me: Workload, cert: CertPair, ca: str, conn_log: LegWriter,
                 component: str, scope_sa: str | None = None, hbone_port: int = istio.HBONE_PORT,
                 rng: random.Random | None = None) -> None:
        self.reg = reg
        self.me = me
        self.cert = cert
        self.ca = ca
        self.legs = LegRecorder(component, conn_log)
        self.scope_sa = scope_sa
        self.hbone_port = hbone_port
        self.rng = rng or random.Random()
        self.server = HboneServer(handler=self.handle, cert_for=lambda _ip: cert, default_cert=cert, ca=ca,
                                  trust_domain=reg.trust_domain, check_authority=False,
                                  on_relay_done=self.legs.relay_done)
        self.ready_fields: dict[str, Any] = {}
        self._readiness: asyncio.AbstractServer | None = None

    @classmethod
    def for_pod(cls, ctx: MeshContext, pod: str) -> Waypoint:
        """The waypoint of pod ``<ns>/<name>`` of a lab, scoped by its Gateway's labels (§7)."""
        me = ctx.registry.pod(pod)
        if me is None:
            raise SystemExit(f"pod {pod!r} is not in the lab registry {ctx.state_dir}")
        cert, key = ctx.cert_for(me.identity)
        component = f"{me.name}.{me.namespace}"
        return cls(reg=ctx.registry, me=me, cert=(str(cert), str(key)), ca=str(ctx.ca_cert),
                   conn_log=ConnLog(ctx.conn_log_path(component)), component=component,
                   scope_sa=me.label(istio.LABEL_FOR_SERVICE_ACCOUNT))

    async def start(self, host: str = "0.0.0.0", port: int = istio.HBONE_PORT,
                    readiness_port: int = istio.READINESS_PORT) -> Waypoint:
        """Listen for HBONE, then for readiness probes (:attr:`ready_fields` says what is up)."""
        await self.server.start(host=host, port=port)
        self._readiness = await serve_readiness(host, readiness_port)
        self.ready_fields = {"app": "waypoint", "name": self.legs.component, "pod": self.me.ref, "ip": self.me.ip,
                             "identity": self.me.identity, "scope_sa": self.scope_sa, "ports": [port, readiness_port]}
        return self

    async def close(self) -> None:
        if self._readiness is not None:
            self._readiness.close()
        await self.server.close()

    # ---- routing (pure) -------------------------------------------------------------------------
    def in_scope(self, wl: Workload) -> bool:
        """§7: same namespace, and same SA if the waypoint is scoped; never another waypoint."""
        return (wl.namespace == self.me.namespace and wl.mode != "waypoint"
                and (self.scope_sa is None or wl.service_account == self.scope_sa))

    def route(self, dest: tuple[str, int]) -> WaypointTarget | int:
        """CONNECT authority -> target, or the status to answer with."""
        ip, port = dest
        svc = self.reg.service(ip, port)
        if svc is not None:
            eps = [self.reg.workloads[e] for e in svc.endpoints if e in self.reg.workloads]
            eps = [w for w in eps if self.in_scope(w)]
            if not eps:
                return 503  # inbound-vip cluster with no endpoint in scope: no healthy upstream
            return WaypointTarget(self.rng.choice(eps), svc.target_port, "vip")
        wl = self.reg.workload(ip)
        if wl is None:
            return 404
        if not self.in_scope(wl):
            return 401
        return WaypointTarget(wl, port, "pod")

    # ---- HboneServer callback -------------------------------------------------------------------
    async def handle(self, req: ConnectRequest) -> Endpoint | int:
        assert req.dest is not None
        leg = self.legs.start(LISTENER, req.peer_addr, req.authority, req.local_addr, proto="hbone",
                              src_id=req.peer_identity or "")
        target = self.route(req.dest)
        if isinstance(target, int):
            self.legs.record(leg, str(target))
            return target
        leg.extra["via"] = target.via
        leg.authority, leg.dst_id = target.authority, target.endpoint.identity
        tunnel = (target.endpoint.ip, self.hbone_port)
        leg.up_dst = addr(tunnel)
        try:
            up = await connect_originate(leg, tunnel, target.authority, cert=self.cert, ca=self.ca,
                                         expected_identity=target.endpoint.identity, source=(self.me.ip, 0))
        except (HboneError, OSError, TimeoutError) as e:
            # Envoy's tcp_proxy would reset; an HTTP status tells the caller more (lab choice)
            self.legs.record(leg, failure_outcome(e))
            return 503
        return self.legs.park(req, leg, up)
