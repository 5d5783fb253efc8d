"""Topology -> plan: deterministic, complete, and consistent with the network model."""

from __future__ import annotations

import ipaddress
import json

import pytest

from netlab.cli import main
from netlab.plan.build import build_plan
from netlab.plan.types import Link, Plan, Route
from netlab.topology.load import load_topology


def plan_of(name: str, **kw: object) -> Plan:
    return build_plan(load_topology(name), **kw)  # type: ignore[arg-type]


def test_plan_is_deterministic_and_round_trips() -> None:
    a, b = plan_of("sidecar-to-ambient"), plan_of("sidecar-to-ambient")
    assert a.to_json() == b.to_json()
    assert Plan.from_dict(json.loads(a.to_json())) == a


def test_every_interface_name_fits_ifnamsiz() -> None:
    p = plan_of("coexistence")
    for link in p.links:
        assert len(link.name) <= 15, link
        assert link.peer_name is None or len(link.peer_name) <= 15


def test_two_nodes_addressing() -> None:
    p = plan_of("two-nodes", lab="x")
    assert [n.netns for n in p.nodes] == ["x-node-a", "x-node-b"]
    assert {n.name: n.pod_cidr for n in p.nodes} == {"node-a": "10.0.1.0/24", "node-b": "10.0.2.0/24"}
    ips = [pod.ip for pod in p.pods]
    assert len(set(ips)) == len(ips)
    for pod in p.pods:
        node = p.node(pod.node)
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(node.pod_cidr)
        # ptp: /32 host route on the node side, default via HOST_IP in the pod
        assert Route(netns=node.netns, dst=f"{pod.ip}/32", dev=pod.host_veth, scope="link") in p.routes
        assert Route(netns=pod.netns, dst="0.0.0.0/0", gateway=node.host_ip, dev="eth0") in p.routes
    # nodes reach each other's pod CIDRs over the fabric
    assert Route(netns="x-node-a", dst="10.0.2.0/24", gateway=p.node("node-b").ip, dev="eth0") in p.routes
    # nothing is placed in the root namespace: every netns-bound object names a lab netns
    names = {n.name for n in p.netns}
    for o in p.objects():
        ns = getattr(o, "netns", None)
        if ns is not None and not hasattr(o, "role"):
            assert ns in names, o
        if isinstance(o, Link) and o.peer_netns:
            assert o.peer_netns in names


def test_ambient_topology_has_a_ztunnel_per_node() -> None:
    p = plan_of("ambient-to-sidecar")
    zt = [x for x in p.pods if x.mode == "ztunnel"]
    assert sorted(x.node for x in zt) == ["node-a", "node-b"]
    assert all(x.namespace == "istio-system" for x in zt)
    modes = {x.ref: x.mode for x in p.pods}
    assert modes["foo/sleep"] == "ambient" and modes["bar/httpbin"] == "sidecar"


def test_plain_topology_has_no_ztunnel() -> None:
    assert not [x for x in plan_of("two-nodes").pods if x.mode == "ztunnel"]


def test_services_get_vips_and_endpoints() -> None:
    p = plan_of("sidecar-to-ambient")
    svc = {s.name: s for s in p.services}
    assert svc["httpbin"].port == 8000 and svc["httpbin"].target_port == 80
    assert svc["httpbin"].endpoints == ("bar-1/httpbin",)
    assert svc["helloworld"].endpoints == ("bar-2/helloworld",)
    hosts = {f.path: f.content for f in p.files}
    sleep_ns = p.pod("foo/sleep").netns
    assert f"{svc['httpbin'].vip}\thttpbin.bar-1 " in hosts[f"/etc/netns/{sleep_ns}/hosts"]


def test_netns_collision_is_a_clear_error(tmp_path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text("name: t\nnodes: [{name: n1}]\nnamespaces: {a-b: {}, a: {}}\n"
                 "pods: [{name: c, namespace: a-b, node: n1}, {name: b-c, namespace: a, node: n1}]\n")
    assert main(["plan", str(f)]) == 2


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_plan_cli_prints_without_root(fmt: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "ambient-to-sidecar", *fmt]) == 0
    out = capsys.readouterr().out
    assert "ztunnel-PREROUTING" in out
    if fmt:
        assert json.loads(out)["lab"] == "ambient-to-sidecar"


def test_progress_printer_logs_each_stage_once_when_not_a_terminal(capsys):
    """Where stderr is a log (CI, a pipe), `netlab up` prints one line per stage as it
    completes. It used to print none: the stage's first (0/N) call already marked it seen."""
    from netlab.cli import _progress_printer

    show = _progress_printer(quiet=False)
    for stage, total in (("pods", 3), ("configure", 5)):
        for done in range(total + 1):
            show(stage, done, total)
        show(stage, total, total)  # a repeated final report (the pods phase polls)
    assert capsys.readouterr().err.splitlines() == ["  pods             3/3", "  configure        5/5"]
    assert _progress_printer(quiet=True) is None
