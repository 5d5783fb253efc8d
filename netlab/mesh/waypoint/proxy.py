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
import time
from dataclasses import dataclass

from netlab import istio
from netlab.mesh.connlog import ConnLog, Leg, addr
from netlab.mesh.hbone import (TLS_HANDSHAKE_TIMEOUT_S, CertPair, ConnectRequest, HboneError, HboneServer,
                               format_authority, hbone_connect)
from netlab.mesh.registry import Registry, Workload
from netlab.mesh.relay import Endpoint, RelayResult
from netlab.mesh.sidecar.base import finish_parked_leg, watch_orphan

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

    def __init__(self, *, reg: Registry, me: Workload, cert: CertPair, ca: str, conn_log: ConnLog,
                 component: str, scope_sa: str | None = None, hbone_port: int = istio.HBONE_PORT,
                 rng: random.Random | None = None) -> None:
        self.reg = reg
        self.me = me
        self.cert = cert
        self.ca = ca
        self.conn_log = conn_log
        self.component = component
        self.scope_sa = scope_sa
        self.hbone_port = hbone_port
        self.rng = rng or random.Random()
        self._legs: dict[object, Leg] = {}  # keyed by the HboneStream (identity)
        self.server = HboneServer(handler=self.handle, cert_for=lambda _ip: cert, default_cert=cert, ca=ca,
                                  trust_domain=reg.trust_domain, check_authority=False, on_relay_done=self.done)

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

    # ---- HboneServer callbacks ------------------------------------------------------------------
    async def handle(self, req: ConnectRequest) -> Endpoint | int:
        assert req.dest is not None
        leg = Leg(component=self.component, listener=LISTENER, src=addr(req.peer_addr), orig_dst=req.authority,
                  local=addr(req.local_addr), proto="hbone", src_id=req.peer_identity or "")
        target = self.route(req.dest)
        if isinstance(target, int):
            self.conn_log.write(leg.finish(str(target)))
            return target
        leg.extra["via"] = target.via
        leg.authority, leg.dst_id = target.authority, target.endpoint.identity
        tunnel = (target.endpoint.ip, self.hbone_port)
        leg.up_dst = addr(tunnel)
        t0 = time.monotonic()
        try:
            up = await hbone_connect(
                tunnel, target.authority, client_cert=self.cert[0], client_key=self.cert[1], ca=self.ca,
                expected_identity=target.endpoint.identity, source=(self.me.ip, 0),
                # Envoy's 2 s connect_timeout for the TCP connect; the TLS handshake and the
                # CONNECT response get the lab's limit (docs/deviations.md)
                timeout=istio.WAYPOINT_CONNECT_TIMEOUT_S, tls_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        except HboneError as e:
            # Envoy's tcp_proxy would reset; an HTTP status tells the caller more (lab choice)
            leg.extra["hbone_ms"] = round((time.monotonic() - t0) * 1000, 1)
            self.conn_log.write(leg.finish(str(e.status) if e.status is not None else f"error:{e.reason}"))
            return 503
        except (OSError, asyncio.TimeoutError) as e:
            self.conn_log.write(leg.finish(f"error:{e}"))
            return 503
        leg.up_src = addr(up.local_addr)
        leg.extra["hbone_ms"] = round((time.monotonic() - t0) * 1000, 1)  # TCP + TLS + CONNECT
        if req.stream is not None:
            self._legs[req.stream] = leg
            watch_orphan(req, self._legs, self.conn_log)
        return up

    def done(self, req: ConnectRequest, res: RelayResult) -> None:
        finish_parked_leg(self._legs, self.conn_log, req, res)
