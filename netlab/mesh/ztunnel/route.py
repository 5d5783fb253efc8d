"""ztunnel's routing decisions as pure functions over the registry (reference §4.2, §5.1, §7).

Nothing here touches a socket, so the same code that runs in the proxy is unit-tested without
root. Each ``plan_*`` returns either a :class:`Reject` (why the connection is refused) or a
:class:`Route` (where to connect, from which source, with which HBONE parameters).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Literal

from netlab.mesh.hbone import format_authority
from netlab.mesh.registry import Registry, Workload
from netlab.mesh.ztunnel.authz import AllowAll, Authorizer, Connection

RouteKind = Literal["waypoint", "hbone", "fast_path", "tcp", "passthrough", "hairpin", "local"]


@dataclass(frozen=True)
class Reject:
    """Refuse the connection. ``reason`` is ztunnel's error name; ``status`` the HBONE status
    for inbound 15008 (None where there is no HTTP to answer with: the socket is reset)."""

    reason: str  # UnknownSource | SelfCall | NoHealthyUpstream | UnknownWorkload | BadAuthority | BypassWaypoint | Denied
    status: int | None = None


@dataclass(frozen=True)
class Route:
    """Where one connection goes.

    ``addr`` is what we connect to: ``<pod|waypoint>:15008`` for HBONE, else ``<pod>:<port>``.
    ``source_ip`` is the IP to bind (spoofed); None means ztunnel's own address.
    For HBONE: ``authority`` (``:authority``), ``expected_identity`` (server SAN),
    ``client_identity`` (our client cert = the source workload's identity).
    """

    kind: RouteKind
    addr: tuple[str, int]
    source_ip: str | None
    dst: Workload | None = None  # the resolved destination workload (None for passthrough)
    target: tuple[str, int] | None = None  # resolved <pod IP>:<target port>
    authority: str = ""
    expected_identity: str | None = None
    client_identity: str | None = None

    @property
    def hbone(self) -> bool:
        return self.kind in ("waypoint", "hbone", "hairpin")


Decision = Route | Reject


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def local_workload(reg: Registry, node: str, ip: str) -> Workload | None:
    """A workload this ztunnel serves inbound: captured (ambient) and on this node."""
    wl = reg.workload(ip)
    if wl is None or wl.node != node or wl.mode != "ambient":
        return None
    return wl


def _to_waypoint(wp: Workload, orig_dst: tuple[str, int], source_ip: str | None, src: Workload,
                 dst: Workload, target: tuple[str, int], hbone_port: int, kind: RouteKind) -> Route:
    return Route(kind=kind, addr=(wp.ip, hbone_port), source_ip=source_ip, dst=dst, target=target,
                 authority=format_authority(*orig_dst), expected_identity=wp.identity,
                 client_identity=src.identity)


def plan_outbound(reg: Registry, node: str, own_ip: str, src_ip: str, orig_dst: tuple[str, int], *,
                  hbone_port: int = 15008, authz: Authorizer | None = None,
                  rng: random.Random | None = None) -> Decision:
    """Outbound (15001): a captured pod on this node connects to ``orig_dst`` (ZT-OUT ``build_request``).

    1. the source must be a known workload (else ``UnknownSource``); a destination equal to our own
       IP is ``SelfCall``;
    2. ``orig_dst`` resolves through the registry (VIP -> random endpoint + targetPort); a service
       VIP with no endpoint is ``NoHealthyUpstream`` (the connection is reset at once, as ztunnel
       does, instead of dialling the VIP, which nothing answers, for the 10 s connect timeout);
    3. destination with a waypoint -> HBONE to the waypoint pod, ``:authority`` = ``orig_dst``;
       HBONE destination on this node (not native HBONE) -> same-node fast path (RBAC, direct);
       other HBONE destination -> HBONE to ``<pod>:15008``, ``:authority`` = ``<pod>:<port>``;
       TCP destination -> plain TCP to ``<pod>:<port>``; unknown -> plain TCP to ``orig_dst``.
    The client pod IP is the source of every upstream connection.
    """
    src = reg.workload(src_ip)
    if src is None:
        return Reject("UnknownSource")
    if _same_ip(orig_dst[0], own_ip):
        return Reject("SelfCall")
    resolved = reg.resolve(orig_dst[0], orig_dst[1], rng)
    if resolved is None:
        if reg.service(orig_dst[0], orig_dst[1]) is not None:
            return Reject("NoHealthyUpstream")
        return Route(kind="passthrough", addr=orig_dst, source_ip=src_ip, client_identity=src.identity)
    dst, port = resolved
    target = (dst.ip, port)
    wp = reg.waypoint_of(dst)
    if wp is not None:
        return _to_waypoint(wp, orig_dst, src_ip, src, dst, target, hbone_port, "waypoint")
    if dst.protocol == "HBONE":
        if dst.node == node and not dst.native_hbone:
            conn = Connection(src_identity=src.identity, src_ip=src_ip, dst=dst, dst_port=port)
            if not (authz or AllowAll()).allow(conn):
                return Reject("Denied")
            return Route(kind="fast_path", addr=target, source_ip=src_ip, dst=dst, target=target,
                         client_identity=src.identity)
        return Route(kind="hbone", addr=(dst.ip, hbone_port), source_ip=src_ip, dst=dst, target=target,
                     authority=format_authority(*target), expected_identity=dst.identity,
                     client_identity=src.identity)
    return Route(kind="tcp", addr=target, source_ip=src_ip, dst=dst, target=target, client_identity=src.identity)


@dataclass(frozen=True)
class InboundRoute:
    """Inbound HBONE (15008) verdict: connect to ``target`` from ``source_ip``."""

    dst: Workload
    target: tuple[str, int]
    source_ip: str
    from_waypoint: bool


def plan_inbound(reg: Registry, node: str, local_ip: str, peer_ip: str, peer_identities: tuple[str, ...],
                 authority: tuple[str, int] | None, forwarded_for: str | None, *,
                 authz: Authorizer | None = None) -> InboundRoute | Reject:
    """Inbound HBONE (ZT-IN ``inbound.rs``): checks in ztunnel's order, each with its status.

    authority not ``ip:port`` or its IP != the connection's original destination -> 400;
    destination not a workload of this node -> 404; destination has a waypoint and the caller is
    not it -> 401; RBAC deny -> 401 (skipped for the waypoint). Source of the upstream connection:
    the TLS peer IP, or, when the peer is the destination's waypoint, ``Forwarded: for=`` if present.
    """
    if authority is None or not _same_ip(authority[0], local_ip):
        return Reject("BadAuthority", 400)
    dst = local_workload(reg, node, local_ip)
    if dst is None:
        return Reject("UnknownWorkload", 404)
    wp_ids = {w.identity for ip in dst.waypoints if (w := reg.workload(ip)) is not None}
    from_waypoint = bool(wp_ids) and any(i in wp_ids for i in peer_identities)
    if wp_ids and not from_waypoint:
        return Reject("BypassWaypoint", 401)
    source_ip = peer_ip
    if from_waypoint:
        source_ip = forwarded_for or peer_ip
    else:
        ident = peer_identities[0] if peer_identities else None
        conn = Connection(src_identity=ident, src_ip=peer_ip, dst=dst, dst_port=authority[1])
        if not (authz or AllowAll()).allow(conn):
            return Reject("Denied", 401)
    return InboundRoute(dst=dst, target=(dst.ip, authority[1]), source_ip=source_ip, from_waypoint=from_waypoint)


def plan_plaintext(reg: Registry, node: str, own_ip: str, peer_ip: str, orig_dst: tuple[str, int], *,
                   hbone_port: int = 15008, authz: Authorizer | None = None) -> Decision:
    """Inbound plaintext (15006, ZT-PT ``inbound_passthrough.rs``): a non-mesh client reaches a pod here.

    Destination with a waypoint -> hairpin: HBONE to the waypoint, **not** spoofed (own IP; source
    and waypoint may both be remote), client cert = the caller's workload identity if it is known
    (else ``UnknownSource``, as the outbound path would say). Otherwise RBAC (no identity) and a
    connection to the pod from the caller's IP.

    A connection to ztunnel's own IP is ``SelfCall`` (``inbound_passthrough.rs``: "User sent a
    request to the ztunnel directly. This isn't allowed"): served, it made ztunnel dial itself
    from the caller's spoofed IP, a SYN that is never answered, 2 fds held for the 10 s connect
    timeout per connection.
    """
    if _same_ip(orig_dst[0], own_ip):
        return Reject("SelfCall")
    dst = reg.workload(orig_dst[0])
    if dst is not None:
        wp = reg.waypoint_of(dst)
        if wp is not None:
            src = reg.workload(peer_ip)
            if src is None:
                return Reject("UnknownSource")
            return _to_waypoint(wp, orig_dst, None, src, dst, orig_dst, hbone_port, "hairpin")
        conn = Connection(src_identity=None, src_ip=peer_ip, dst=dst, dst_port=orig_dst[1])
        if not (authz or AllowAll()).allow(conn):
            return Reject("Denied")
    return Route(kind="local", addr=orig_dst, source_ip=peer_ip, dst=dst, target=orig_dst)


# ================================================================================================
# ztunnel 1.30.3, in-pod (inpod reference §3.4-§3.6): one set of listeners per enrolled pod, so
# the source workload is the pod whose netns the listener is in, and nothing is spoofed outbound.
# ================================================================================================
_OWN_PORTS = (15001, 15006, 15008)  # istio.ZTUNNEL_OUTBOUND_PORT, ..._INBOUND_PLAINTEXT_PORT, HBONE_PORT


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def plan_outbound_inpod(reg: Registry, src: Workload, orig_dst: tuple[str, int], *, hbone_port: int = 15008,
                        rng: random.Random | None = None) -> Decision:
    """Outbound (15001 in ``src``'s netns; ZOUT ``build_request`` L536-730):

    1. a loopback destination on 15001/15006/15008 is ``SelfCall`` (L185-190);
    2. a Service VIP: its waypoint if the Service has one (``istio.io/use-waypoint``) -> HBONE to
       the waypoint pod's 15008, ``:authority <VIP>:<port>``; else an endpoint; none ->
       ``NoHealthyUpstream``;
    3. then by the workload's ``tunnel_protocol``: HBONE (enrolled pods, waypoints, sidecars
       labelled ``networking.istio.io/tunnel=http``) -> ``<podIP>:15008`` with ``:authority
       <podIP>:<targetPort>``; else plain TCP to ``<podIP>:<targetPort>``; an unknown address ->
       plain TCP to itself (passthrough).

    No same-node fast path (#915) and no waypoint for pod-addressed traffic (``waypoint-for:
    service``). ``source_ip`` is None: the upstream socket is made in the pod's netns, its source
    is the pod's own IP.
    """
    if _is_loopback(orig_dst[0]) and orig_dst[1] in _OWN_PORTS:
        return Reject("SelfCall")
    svc = reg.service(orig_dst[0], orig_dst[1])
    if svc is not None:
        wp = reg.service_waypoint(svc)
        if wp is not None and wp.ip != src.ip:
            return Route(kind="waypoint", addr=(wp.ip, hbone_port), source_ip=None, target=orig_dst,
                         authority=format_authority(*orig_dst), expected_identity=wp.identity,
                         client_identity=src.identity)
    resolved = reg.resolve(orig_dst[0], orig_dst[1], rng)
    if resolved is None:
        if svc is not None:
            return Reject("NoHealthyUpstream")
        return Route(kind="passthrough", addr=orig_dst, source_ip=None, client_identity=src.identity)
    dst, port = resolved
    target = (dst.ip, port)
    if dst.protocol == "HBONE":
        return Route(kind="hbone", addr=(dst.ip, hbone_port), source_ip=None, dst=dst, target=target,
                     authority=format_authority(*target), expected_identity=dst.identity,
                     client_identity=src.identity)
    return Route(kind="tcp", addr=target, source_ip=None, dst=dst, target=target, client_identity=src.identity)


def plan_inbound_inpod(reg: Registry, pod: Workload, local_ip: str, peer_ip: str, peer_identities: tuple[str, ...],
                       authority: tuple[str, int] | None, *, authz: Authorizer | None = None) -> InboundRoute | Reject:
    """Inbound HBONE (15008 in ``pod``'s netns; ZIN ``inbound.rs``), checks in 1.30.3's order:

    the authority unparsable -> 400; the local workload missing -> 503; ``validate_destination``:
    the authority's IP must be the connection's destination (``local_ip``) -> else 400
    ``IPMismatch``; a target port of ztunnel's own (15001/15006/15008) -> 503; RBAC -> 401. No
    waypoint-bypass check (#873): a caller that skipped the waypoint is served like any other.
    The app is reached from the TCP peer of the 15008 connection (not ``Forwarded``)."""
    if authority is None:
        return Reject("BadAuthority", 400)
    wl = reg.workload(pod.ip)
    if wl is None or not _same_ip(local_ip, pod.ip):
        return Reject("UnknownWorkload", 503)
    if not _same_ip(authority[0], local_ip):
        return Reject("IPMismatch", 400)
    if authority[1] in _OWN_PORTS:
        return Reject("BadPort", 503)
    ident = peer_identities[0] if peer_identities else None
    conn = Connection(src_identity=ident, src_ip=peer_ip, dst=wl, dst_port=authority[1])
    if not (authz or AllowAll()).allow(conn):
        return Reject("Denied", 401)
    return InboundRoute(dst=wl, target=(wl.ip, authority[1]), source_ip=peer_ip,
                        from_waypoint=any(reg.is_waypoint_identity(i) for i in peer_identities))


def plan_plaintext_inpod(reg: Registry, pod: Workload, peer_ip: str, orig_dst: tuple[str, int], *,
                         authz: Authorizer | None = None) -> Decision:
    """Inbound plaintext (15006 in ``pod``'s netns; ZPT L125-246): RBAC without an identity
    (a deny closes the connection), then the original destination from the peer's IP. No
    waypoint hairpin in 1.30.3."""
    if orig_dst[1] in _OWN_PORTS:
        return Reject("SelfCall")
    conn = Connection(src_identity=None, src_ip=peer_ip, dst=pod, dst_port=orig_dst[1])
    if not (authz or AllowAll()).allow(conn):
        return Reject("Denied")
    return Route(kind="local", addr=orig_dst, source_ip=peer_ip, dst=pod, target=orig_dst)
