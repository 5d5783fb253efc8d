"""What every ztunnel listener shares (ztunnel ``proxy.rs`` ``ProxyInputs``), and the one way
upstream connections are opened (``freebind_connect`` + HBONE client).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.mesh import hbone
from netlab.mesh.bootstrap import MeshContext, ztunnel_identity
from netlab.mesh.connlog import addr
from netlab.mesh.endpoint import Endpoint
from netlab.mesh.legs import LegRecorder
from netlab.mesh.registry import Registry, Workload
from netlab.mesh.relay import TcpStream, tcp_connect
from netlab.mesh.sockets import Address, MakeSocket, client_socket
from netlab.mesh.ztunnel.authz import AllowAll, Authorizer
from netlab.mesh.ztunnel.config import ZtunnelConfig
from netlab.mesh.ztunnel.route import Reject, Route

log = logging.getLogger("netlab.ztunnel")


@dataclass
class ProxyInputs:
    cfg: ZtunnelConfig
    ctx: MeshContext
    legs: LegRecorder
    authz: Authorizer = field(default_factory=AllowAll)
    rng: random.Random = field(default_factory=random.Random)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def registry(self) -> Registry:
        return self.ctx.registry

    @property
    def ca(self) -> Path:
        return self.ctx.ca_cert

    def own_cert(self) -> tuple[Path, Path]:
        """ztunnel's own identity: served when a CONNECT targets no local workload (then 404)."""
        return self.ctx.cert_for(ztunnel_identity(self.registry.trust_domain))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a per-connection task, keeping a reference so it is not collected mid-flight."""
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def spoof(self, source_ip: str | None) -> tuple[Address | None, bool]:
        """(bind address, transparent) for an upstream socket; no spoofing when disabled."""
        if source_ip is None or not self.cfg.transparent:
            return None, False
        return (source_ip, 0), True


def hbone_headers(src: Workload | None, client_ip: str, reg: Registry | None = None) -> list[tuple[str, str]]:
    """ztunnel's CONNECT headers: baggage of the source workload, Forwarded for=, traceparent.
    (1.30.3 sends ``baggage`` only with ``AMBIENT_ENABLE_BAGGAGE``, off by default, inpod §4.3.)"""
    hdrs: list[tuple[str, str]] = []
    if src is not None and not (reg is not None and reg.inpod):
        hdrs.append((hbone.BAGGAGE_HEADER, hbone.baggage_header(
            namespace=src.namespace, workload_name=src.name, service_name=src.app or src.name)))
    hdrs.append((hbone.FORWARDED_HEADER, hbone.forwarded_header(client_ip)))
    hdrs.append((hbone.TRACEPARENT_HEADER, hbone.new_traceparent()))
    return hdrs


async def open_upstream(pi: ProxyInputs, route: Route, client_ip: str, make: MakeSocket | None = None) -> Endpoint:
    """Connect where ``route`` says: HBONE (mTLS as the source workload) or plain TCP, from the
    spoofed ``route.source_ip`` (or our own IP). ``make``: where the socket is made (in-pod: the
    pod's :class:`~netlab.mesh.sockets.PodSocketFactory`). Raises HboneError / OSError / TimeoutError."""
    source, transparent = pi.spoof(route.source_ip)
    sock = client_socket(route.addr, source, transparent, make=make) if make is not None else None
    if route.hbone:
        assert route.client_identity is not None
        cert, key = pi.ctx.cert_for(route.client_identity)
        src_wl = pi.registry.workload(client_ip)
        return await hbone.hbone_connect(  # (closes ``sock`` if it fails)
            route.addr, route.authority, client_cert=cert, client_key=key, ca=pi.ca,
            expected_identity=route.expected_identity, headers=hbone_headers(src_wl, client_ip, pi.registry),
            source=source, transparent=transparent, sock=sock, timeout=pi.cfg.connect_timeout)
    try:
        return await tcp_connect(route.addr, source=source, transparent=transparent, sock=sock,
                                 timeout=pi.cfg.connect_timeout)
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def upstream_failure(e: BaseException) -> str:
    """Connection-log outcome for a failed upstream: the HBONE status if one came back."""
    if isinstance(e, hbone.HboneError) and e.status is not None:
        return str(e.status)
    return f"error:{e}"[:200]


Decide = Callable[[str, Address], Route | Reject]


async def serve_captured(pi: ProxyInputs, down: TcpStream, listener: str, decide: Decide, *,
                         make: MakeSocket | None = None, pod: str = "") -> None:
    """One captured TCP connection (15001 or 15006): decide, connect upstream, relay, log one leg.

    A rejected or failed connection is reset (RST), as ztunnel drops the socket on error.
    In-pod (``pod``: the enrolled pod whose netns the listener is in; ``make``: its socket
    factory), the original destination is ``SO_ORIGINAL_DST`` (REDIRECT), the upstream socket is
    made in the pod, and the leg says which pod (``extra.pod``).
    """
    peer, local = down.peer_addr, down.local_addr
    orig = down.original_dst() if pod else local
    if not peer or not local or not orig:  # the client went away between accept and here
        down.abort()
        return
    leg = pi.legs.start(listener, peer, addr(orig), local)
    if pod:
        leg.extra["pod"] = pod
    d = decide(peer[0], orig)
    if isinstance(d, Reject):
        down.abort()
        leg.extra["reason"] = d.reason
        if d.reason == "NoHealthyUpstream":  # Envoy's and ztunnel's words for "no endpoint"
            log.warning("no healthy upstream: service %s has no endpoints (client %s)", leg.orig_dst, leg.src)
            pi.legs.record(leg, "no_healthy_upstream")
        else:
            pi.legs.record(leg, "refused")
        return
    leg.proto = "hbone" if d.hbone else "tcp"
    leg.up_dst = addr(d.addr)
    leg.authority = d.authority
    leg.src_id = d.client_identity or ""
    leg.dst_id = d.expected_identity or (d.dst.identity if d.dst else "")
    leg.extra["route"] = d.kind
    try:
        up = await open_upstream(pi, d, peer[0], make)
    except Exception as e:  # noqa: BLE001 - every failure is a reset plus a log line
        down.abort()
        leg.up_src = addr(e.local_addr if isinstance(e, hbone.HboneError) else None)
        pi.legs.record(leg, upstream_failure(e))
        return
    await pi.legs.relay(leg, down, up)
