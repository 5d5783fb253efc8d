"""ztunnel routing decisions (reference §4.2, §5.1, §7) over registries built from real topologies."""

from __future__ import annotations

import dataclasses
import random

import pytest

from netlab.mesh.hbone import BAGGAGE_HEADER, FORWARDED_HEADER, TRACEPARENT_HEADER, parse_baggage
from netlab.mesh.registry import Registry, build_registry
from netlab.mesh.ztunnel.authz import Connection
from netlab.mesh.ztunnel.proxy import hbone_headers
from netlab.mesh.ztunnel.route import Reject, Route, plan_inbound, plan_outbound, plan_plaintext
from netlab.plan.build import build_plan
from netlab.topology.load import load_topology


def _reg(name: str) -> Registry:
    return build_registry(build_plan(load_topology(name)))


@pytest.fixture(scope="module")
def co() -> Registry:
    return _reg("coexistence")


@pytest.fixture(scope="module")
def a2a() -> Registry:
    return _reg("ambient-to-ambient")


def ip_of(reg: Registry, ref: str) -> str:
    return next(w.ip for w in reg.workloads.values() if w.ref == ref)


def vip_of(reg: Registry, ns: str, name: str) -> tuple[str, int]:
    s = next(s for s in reg.services.values() if (s.namespace, s.name) == (ns, name))
    return s.vip, s.port


def ident(reg: Registry, ref: str) -> str:
    return reg.workload(ip_of(reg, ref)).identity  # type: ignore[union-attr]


class Deny:
    def __init__(self) -> None:
        self.seen: list[Connection] = []

    def allow(self, conn: Connection) -> bool:
        self.seen.append(conn)
        return False


# ---------------------------------------------------------------------------------------------- outbound
def test_outbound_cross_node_hbone_via_vip(co: Registry) -> None:
    src = ip_of(co, "amb/sleep")
    d = plan_outbound(co, "node-a", co.ztunnels["node-a"], src, vip_of(co, "bar-1", "httpbin"))
    pod = ip_of(co, "bar-1/httpbin")
    assert isinstance(d, Route) and d.kind == "hbone" and d.hbone
    assert d.addr == (pod, 15008)
    assert d.authority == f"{pod}:80"  # resolved pod : targetPort, not the VIP
    assert d.target == (pod, 80)
    assert d.source_ip == src
    assert d.expected_identity == ident(co, "bar-1/httpbin")
    assert d.client_identity == ident(co, "amb/sleep")


def test_outbound_waypoint_keeps_original_destination_as_authority(co: Registry) -> None:
    src = ip_of(co, "amb/sleep")
    wp = co.workload(ip_of(co, "bar-2/waypoint"))
    assert wp is not None and wp.mode == "waypoint"
    for orig in (vip_of(co, "bar-2", "helloworld"), (ip_of(co, "bar-2/helloworld"), 5000)):
        d = plan_outbound(co, "node-a", co.ztunnels["node-a"], src, orig)
        assert isinstance(d, Route) and d.kind == "waypoint"
        assert d.addr == (wp.ip, 15008)
        assert d.authority == f"{orig[0]}:{orig[1]}"
        assert d.expected_identity == wp.identity
        assert d.source_ip == src and d.client_identity == ident(co, "amb/sleep")


def test_outbound_tcp_destination_gets_plain_tcp(co: Registry) -> None:
    src = ip_of(co, "amb/sleep")
    d = plan_outbound(co, "node-a", co.ztunnels["node-a"], src, vip_of(co, "bar", "httpbin"))
    assert isinstance(d, Route) and d.kind == "tcp" and not d.hbone
    assert d.addr == (ip_of(co, "bar/httpbin"), 80) and d.source_ip == src


def test_outbound_unknown_destination_is_passthrough(co: Registry) -> None:
    src = ip_of(co, "amb/sleep")
    d = plan_outbound(co, "node-a", co.ztunnels["node-a"], src, ("192.0.2.7", 443))
    assert isinstance(d, Route) and d.kind == "passthrough"
    assert d.addr == ("192.0.2.7", 443) and d.source_ip == src and d.dst is None


def test_outbound_same_node_fast_path(a2a: Registry) -> None:
    src = ip_of(a2a, "foo/sleep")
    d = plan_outbound(a2a, "node-a", a2a.ztunnels["node-a"], src, vip_of(a2a, "bar", "httpbin-local"))
    local = ip_of(a2a, "bar/httpbin-local")
    assert isinstance(d, Route) and d.kind == "fast_path" and not d.hbone
    assert d.addr == (local, 80) and d.source_ip == src and d.authority == ""
    # the same destination seen from the other node's ztunnel is network HBONE
    d2 = plan_outbound(a2a, "node-b", a2a.ztunnels["node-b"], src, (local, 80))
    assert isinstance(d2, Route) and d2.kind == "hbone" and d2.addr == (local, 15008)


def test_outbound_native_hbone_on_same_node_is_not_fast_pathed(a2a: Registry) -> None:
    local = ip_of(a2a, "bar/httpbin-local")
    reg = dataclasses.replace(a2a, workloads=dict(a2a.workloads))
    reg.workloads[local] = dataclasses.replace(reg.workloads[local], native_hbone=True)
    d = plan_outbound(reg, "node-a", reg.ztunnels["node-a"], ip_of(reg, "foo/sleep"), (local, 80))
    assert isinstance(d, Route) and d.kind == "hbone" and d.authority == f"{local}:80"


def test_outbound_fast_path_consults_authz(a2a: Registry) -> None:
    deny = Deny()
    d = plan_outbound(a2a, "node-a", a2a.ztunnels["node-a"], ip_of(a2a, "foo/sleep"),
                      (ip_of(a2a, "bar/httpbin-local"), 80), authz=deny)
    assert d == Reject("Denied")
    assert deny.seen[0].src_identity == ident(a2a, "foo/sleep") and deny.seen[0].dst_port == 80


def test_outbound_rejects_unknown_source_and_self_call(co: Registry) -> None:
    zt = co.ztunnels["node-a"]
    assert plan_outbound(co, "node-a", zt, "10.9.9.9", vip_of(co, "bar-1", "httpbin")) == Reject("UnknownSource")
    assert plan_outbound(co, "node-a", zt, ip_of(co, "amb/sleep"), (zt, 15021)) == Reject("SelfCall")


def test_outbound_service_without_endpoints_is_no_healthy_upstream(co: Registry) -> None:
    """Rejected at once (reset), not dialled at the VIP nothing answers (issue 17, 12b)."""
    svc_key = next(k for k, s in co.services.items() if (s.namespace, s.name) == ("bar-1", "httpbin"))
    reg = dataclasses.replace(co, services=dict(co.services))
    reg.services[svc_key] = dataclasses.replace(reg.services[svc_key], endpoints=())
    d = plan_outbound(reg, "node-a", reg.ztunnels["node-a"], ip_of(reg, "amb/sleep"), vip_of(reg, "bar-1", "httpbin"))
    assert d == Reject("NoHealthyUpstream")
    # a VIP's other ports, and addresses nobody knows, are still passed through
    vip, port = vip_of(reg, "bar-1", "httpbin")
    other = plan_outbound(reg, "node-a", reg.ztunnels["node-a"], ip_of(reg, "amb/sleep"), (vip, port + 1))
    assert isinstance(other, Route) and other.kind == "passthrough"


def test_outbound_vip_picks_random_endpoint(co: Registry) -> None:
    ips = [ip_of(co, "bar-1/httpbin"), ip_of(co, "bar/httpbin")]
    svc_key = next(k for k, s in co.services.items() if (s.namespace, s.name) == ("bar-1", "httpbin"))
    reg = dataclasses.replace(co, services=dict(co.services))
    reg.services[svc_key] = dataclasses.replace(reg.services[svc_key], endpoints=tuple(ips))
    kinds = set()
    rng = random.Random(1)
    for _ in range(40):
        d = plan_outbound(reg, "node-a", reg.ztunnels["node-a"], ip_of(reg, "amb/sleep"),
                          vip_of(reg, "bar-1", "httpbin"), rng=rng)
        assert isinstance(d, Route)
        kinds.add(d.kind)
    assert kinds == {"hbone", "tcp"}  # ambient endpoint via HBONE, sidecar (TCP) endpoint plain


# ---------------------------------------------------------------------------------------------- inbound 15008
def test_inbound_direct_uses_tls_peer_ip(co: Registry) -> None:
    pod, src = ip_of(co, "bar-1/httpbin"), ip_of(co, "amb/sleep")
    d = plan_inbound(co, "node-b", pod, src, (ident(co, "amb/sleep"),), (pod, 80), "10.1.1.1")
    assert not isinstance(d, Reject)
    assert d.target == (pod, 80) and d.source_ip == src and not d.from_waypoint  # Forwarded ignored


def test_inbound_status_codes(co: Registry) -> None:
    pod, src, sid = ip_of(co, "bar-1/httpbin"), ip_of(co, "amb/sleep"), (ident(co, "amb/sleep"),)
    assert plan_inbound(co, "node-b", pod, src, sid, None, None) == Reject("BadAuthority", 400)
    assert plan_inbound(co, "node-b", pod, src, sid, ("10.0.2.99", 80), None) == Reject("BadAuthority", 400)
    # not a pod of this node / not captured (sidecar) / ztunnel itself: 404
    assert plan_inbound(co, "node-a", pod, src, sid, (pod, 80), None) == Reject("UnknownWorkload", 404)
    sc = ip_of(co, "bar/httpbin")
    assert plan_inbound(co, "node-b", sc, src, sid, (sc, 80), None) == Reject("UnknownWorkload", 404)
    assert plan_inbound(co, "node-b", "10.0.2.200", src, sid, ("10.0.2.200", 80), None).status == 404
    deny = Deny()
    assert plan_inbound(co, "node-b", pod, src, sid, (pod, 80), None, authz=deny) == Reject("Denied", 401)
    assert deny.seen[0].src_identity == sid[0] and deny.seen[0].src_ip == src


def test_inbound_waypoint_enforced_and_forwarded_honoured(co: Registry) -> None:
    hw = ip_of(co, "bar-2/helloworld")
    wp = co.workload(ip_of(co, "bar-2/waypoint"))
    assert wp is not None
    sleep_id = (ident(co, "amb/sleep"),)
    assert plan_inbound(co, "node-d", hw, ip_of(co, "amb/sleep"), sleep_id, (hw, 5000), None) == \
        Reject("BypassWaypoint", 401)
    deny = Deny()
    d = plan_inbound(co, "node-d", hw, wp.ip, (wp.identity,), (hw, 5000), "10.0.1.3", authz=deny)
    assert not isinstance(d, Reject)
    assert d.from_waypoint and d.source_ip == "10.0.1.3" and deny.seen == []  # RBAC skipped for the waypoint
    d = plan_inbound(co, "node-d", hw, wp.ip, (wp.identity,), (hw, 5000), None)
    assert not isinstance(d, Reject) and d.source_ip == wp.ip


# ---------------------------------------------------------------------------------------------- plaintext 15006
def test_plaintext_spoofs_client(co: Registry) -> None:
    pod, legacy = ip_of(co, "bar-1/httpbin"), ip_of(co, "legacy/sleep")
    d = plan_plaintext(co, "node-b", co.ztunnels["node-b"], legacy, (pod, 80))
    assert isinstance(d, Route) and d.kind == "local" and not d.hbone
    assert d.addr == (pod, 80) and d.source_ip == legacy
    deny = Deny()
    assert plan_plaintext(co, "node-b", co.ztunnels["node-b"], legacy, (pod, 80), authz=deny) == Reject("Denied")
    assert deny.seen[0].src_identity is None


def test_plaintext_to_ztunnels_own_ip_is_a_self_call(co: Registry) -> None:
    """A plain pod dialling ztunnel's IP:15006 made ztunnel dial itself from a spoofed source
    (issue 17, item 4); any port of ztunnel's own IP is refused, as ztunnel's inbound_passthrough does."""
    zt, legacy = co.ztunnels["node-a"], ip_of(co, "legacy/sleep")
    for port in (15006, 15001, 15008, 80):
        assert plan_plaintext(co, "node-a", zt, legacy, (zt, port)) == Reject("SelfCall")


def test_plaintext_hairpins_to_waypoint_unspoofed(co: Registry) -> None:
    hw, legacy = ip_of(co, "bar-2/helloworld"), ip_of(co, "legacy/sleep")
    d = plan_plaintext(co, "node-d", co.ztunnels["node-d"], legacy, (hw, 5000))
    assert isinstance(d, Route) and d.kind == "hairpin" and d.hbone
    assert d.addr == (ip_of(co, "bar-2/waypoint"), 15008) and d.source_ip is None
    assert d.authority == f"{hw}:5000" and d.client_identity == ident(co, "legacy/sleep")
    assert plan_plaintext(co, "node-d", co.ztunnels["node-d"], "172.16.0.9", (hw, 5000)) == Reject("UnknownSource")


def test_hbone_headers(co: Registry) -> None:
    src = co.workload(ip_of(co, "amb/sleep"))
    h = dict(hbone_headers(src, "10.0.1.3"))
    b = parse_baggage(h[BAGGAGE_HEADER])
    assert b["k8s.namespace.name"] == "amb" and b["k8s.deployment.name"] == "sleep"
    assert b["k8s.cluster.name"] == "Kubernetes"
    assert h[FORWARDED_HEADER] == "for=10.0.1.3"
    assert len(h[TRACEPARENT_HEADER].split("-")[1]) == 32
