"""ztunnel 1.30.3's in-pod routing and inbound checks (inpod reference §3.4-§3.6) and the sidecar's
(§4.3-§4.4), as pure functions over a registry built from the coexistence topology under inpod."""

from __future__ import annotations

import pytest

from netlab.mesh.registry import Registry, Workload, build_registry
from netlab.mesh.sidecar.outbound import route_outbound
from netlab.mesh.ztunnel.route import (
    InboundRoute,
    Reject,
    Route,
    plan_inbound_inpod,
    plan_outbound_inpod,
    plan_plaintext_inpod,
)
from netlab.plan.build import build_plan
from netlab.topology.load import load_topology


@pytest.fixture(scope="module")
def co() -> Registry:
    return build_registry(build_plan(load_topology("coexistence"), datapath="inpod"))


def wl(reg: Registry, ref: str) -> Workload:
    w = reg.pod(ref)
    assert w is not None
    return w


def vip(reg: Registry, ns: str, name: str) -> tuple[str, int]:
    s = next(s for s in reg.services.values() if (s.namespace, s.name) == (ns, name))
    return s.vip, s.port


class Deny:
    def allow(self, conn: object) -> bool:
        return False


def test_outbound_vip_with_waypoint_goes_to_the_waypoint(co: Registry) -> None:
    """A2: the Service carries use-waypoint (its namespace's waypoint), so HBONE to the waypoint's
    15008 with the VIP as :authority and the waypoint's identity expected."""
    d = plan_outbound_inpod(co, wl(co, "amb/sleep"), vip(co, "bar-2", "helloworld"))
    w = wl(co, "bar-2/waypoint")
    assert isinstance(d, Route) and d.kind == "waypoint" and d.hbone
    v_ip, v_port = vip(co, "bar-2", "helloworld")
    assert d.addr == (w.ip, 15008) and d.authority == f"{v_ip}:{v_port}"
    assert d.expected_identity == w.identity and d.source_ip is None


def test_outbound_hbone_to_pods_15008_no_fast_path(co: Registry) -> None:
    d = plan_outbound_inpod(co, wl(co, "amb/sleep"), vip(co, "bar-1", "httpbin"))
    h = wl(co, "bar-1/httpbin")
    assert isinstance(d, Route) and d.kind == "hbone" and d.addr == (h.ip, 15008)
    assert d.authority == f"{h.ip}:80" and d.client_identity == wl(co, "amb/sleep").identity
    # pod-addressed helloworld: waypoint-for service, so straight to the pod, even with a waypoint
    hw = wl(co, "bar-2/helloworld")
    d = plan_outbound_inpod(co, wl(co, "amb/sleep"), (hw.ip, 5000))
    assert isinstance(d, Route) and d.kind == "hbone" and d.addr == (hw.ip, 15008)


def test_outbound_sidecar_with_tunnel_label_is_hbone(co: Registry) -> None:
    """S1 under inpod: the sidecar pod carries networking.istio.io/tunnel=http -> HBONE to its 15008."""
    d = plan_outbound_inpod(co, wl(co, "amb/sleep"), vip(co, "bar", "httpbin"))
    s = wl(co, "bar/httpbin")
    assert s.native_hbone and isinstance(d, Route) and d.kind == "hbone" and d.addr == (s.ip, 15008)


def test_outbound_plain_selfcall_passthrough(co: Registry) -> None:
    src = wl(co, "amb/sleep")
    assert plan_outbound_inpod(co, src, ("127.0.0.1", 15008)) == Reject("SelfCall")
    d = plan_outbound_inpod(co, src, ("192.0.2.1", 443))
    assert isinstance(d, Route) and d.kind == "passthrough" and d.addr == ("192.0.2.1", 443)
    legacy = wl(co, "legacy/sleep")
    d = plan_outbound_inpod(co, src, (legacy.ip, 8080))
    assert isinstance(d, Route) and d.kind == "tcp" and d.addr == (legacy.ip, 8080)


def test_inbound_checks_in_order(co: Registry) -> None:
    h = wl(co, "bar-1/httpbin")
    caller = wl(co, "amb/sleep")
    ok = plan_inbound_inpod(co, h, h.ip, caller.ip, (caller.identity,), (h.ip, 80))
    assert isinstance(ok, InboundRoute) and ok.target == (h.ip, 80) and ok.source_ip == caller.ip
    assert plan_inbound_inpod(co, h, h.ip, caller.ip, (caller.identity,), None) == Reject("BadAuthority", 400)
    assert plan_inbound_inpod(co, h, h.ip, caller.ip, (caller.identity,), ("10.9.9.9", 80)) == Reject("IPMismatch", 400)
    assert plan_inbound_inpod(co, h, h.ip, caller.ip, (caller.identity,), (h.ip, 15006)) == Reject("BadPort", 503)
    assert plan_inbound_inpod(co, h, h.ip, caller.ip, (caller.identity,), (h.ip, 80), authz=Deny()) == Reject("Denied", 401)


def test_inbound_no_waypoint_bypass_check(co: Registry) -> None:
    """S3 under inpod: a sidecar caller skips helloworld's waypoint and is served (#873), the app
    sees the caller's IP; from the waypoint, the app sees the waypoint's IP."""
    hw, sc, w = wl(co, "bar-2/helloworld"), wl(co, "sc/sleep"), wl(co, "bar-2/waypoint")
    d = plan_inbound_inpod(co, hw, hw.ip, sc.ip, (sc.identity,), (hw.ip, 5000))
    assert isinstance(d, InboundRoute) and d.source_ip == sc.ip and not d.from_waypoint
    d = plan_inbound_inpod(co, hw, hw.ip, w.ip, (w.identity,), (hw.ip, 5000))
    assert isinstance(d, InboundRoute) and d.source_ip == w.ip and d.from_waypoint


def test_plaintext_no_hairpin(co: Registry) -> None:
    hw, legacy = wl(co, "bar-2/helloworld"), wl(co, "legacy/sleep")
    d = plan_plaintext_inpod(co, hw, legacy.ip, (hw.ip, 5000))
    assert isinstance(d, Route) and d.kind == "local" and d.source_ip == legacy.ip and d.addr == (hw.ip, 5000)
    assert plan_plaintext_inpod(co, hw, legacy.ip, (hw.ip, 5000), authz=Deny()) == Reject("Denied")


def test_sidecars_ignore_waypoints_and_keep_tcp_to_sidecars(co: Registry) -> None:
    """§4.3-§4.4: a sidecar calling a waypointed Service goes straight to the pod's 15008; a
    sidecar endpoint (TLSMode istio) stays non-HBONE; 1.18 still goes via the waypoint."""
    r = route_outbound(co, vip(co, "bar-2", "helloworld"))
    hw = wl(co, "bar-2/helloworld")
    assert r.kind == "hbone" and r.target == (hw.ip, 15008) and r.via_waypoint is None and r.authority == f"{hw.ip}:5000"
    r = route_outbound(co, vip(co, "bar", "httpbin"))
    assert r.kind == "tcp" and r.target == (wl(co, "bar/httpbin").ip, 80)
    old = build_registry(build_plan(load_topology("coexistence")))
    r = route_outbound(old, vip(old, "bar-2", "helloworld"))
    assert r.via_waypoint is not None and r.target == (r.via_waypoint.ip, 15008)
