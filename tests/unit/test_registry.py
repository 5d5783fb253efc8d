"""The registry is what istiod would push: protocols, identities, VIPs and waypoints per §3/§5/§7."""

from __future__ import annotations

import random

from netlab.mesh.registry import Registry, build_registry
from netlab.plan.build import build_plan
from netlab.topology.load import load_topology


def reg_of(name: str) -> Registry:
    return build_registry(build_plan(load_topology(name)))


def test_protocols_and_identities() -> None:
    r = reg_of("coexistence")
    by_ref = {w.ref: w for w in r.workloads.values()}
    assert by_ref["amb/sleep"].protocol == "HBONE"
    assert by_ref["sc/sleep"].protocol == "TCP"  # a sidecar without the tunnel label
    assert by_ref["legacy/sleep"].protocol == "TCP"
    assert by_ref["bar-2/waypoint"].protocol == "HBONE"
    assert by_ref["bar-1/httpbin"].identity == "spiffe://cluster.local/ns/bar-1/sa/httpbin"
    assert len(r.ztunnels) == 4


def test_waypoint_addresses_are_pod_ips_of_the_namespace() -> None:
    r = reg_of("sidecar-to-ambient")
    by_ref = {w.ref: w for w in r.workloads.values()}
    wp = by_ref["bar-2/waypoint"]
    assert by_ref["bar-2/helloworld"].waypoints == (wp.ip,)
    assert by_ref["bar-1/httpbin"].waypoints == ()
    assert r.waypoint_of(by_ref["bar-2/helloworld"]) == wp
    assert r.is_waypoint_identity(wp.identity)


def test_vip_resolves_to_endpoint_and_target_port() -> None:
    r = reg_of("ambient-to-sidecar")
    svc = next(iter(r.services.values()))
    wl, port = r.resolve(svc.vip, 8000, random.Random(1))  # type: ignore[misc]
    assert (wl.ref, port) == ("bar/httpbin", 80)
    assert r.resolve(wl.ip, 80) == (wl, 80)
    assert r.resolve("10.99.99.99", 80) is None


def test_json_round_trip() -> None:
    r = reg_of("coexistence")
    assert Registry.from_json(r.to_json()).to_json() == r.to_json()


def test_pod_labels_travel_in_the_registry() -> None:
    """The proxies learn their pod's labels (the sidecar's ``version`` baggage, a waypoint's
    service-account scope) from the registry, never from the plan: both survive the JSON the
    proxies load, and a waypoint's scope label is the one the plan gave its pod."""
    plan = build_plan(load_topology("coexistence"))
    r = Registry.from_json(build_registry(plan).to_json())
    for p in plan.pods:
        if p.mode == "ztunnel":
            continue
        w = r.pod(p.ref)
        assert w is not None and w.labels == p.labels and w.label("app") == dict(p.labels).get("app")
    sleep = r.pod("sc/sleep")
    assert sleep is not None and sleep.label("version") == "v1"
    assert r.pod("no/such") is None
