"""Diagrams of topologies (no root, no lab): valid SVG carrying every node, pod, tunnel and hop."""

from __future__ import annotations

import argparse
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from netlab.plan.build import build_plan
from netlab.topology.load import load_topology
from netlab.verify import diagram

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed")

# What `netlab trace` reports for S1 (shape of TraceResult.to_dict()["hops"]), abridged.
S1_HOPS = [
    {"n": "1", "netns": "hc-u-foo-sleep", "node": "node-a", "iface": "eth0", "dir": "out", "src": "10.0.1.3:40000",
     "dst": "10.96.0.10:8000", "proto": "tcp", "encap": None, "rules": [], "route": "", "proxy": None},
    {"n": "2", "netns": "hc-u-node-a", "node": "node-a", "iface": "veth2695b381", "dir": "in", "src": "10.0.1.3:40000",
     "dst": "10.96.0.10:8000", "proto": "tcp", "encap": None,
     "rules": ["mangle ztunnel-PREROUTING -j MARK --set-xmark 0x100/0x100"], "route": "", "proxy": None},
    {"n": "3", "netns": "hc-u-node-a", "node": "node-a", "iface": "istioout", "dir": "out", "src": "10.0.1.3:40000",
     "dst": "10.96.0.10:8000", "proto": "tcp", "encap": {"type": "geneve", "vni": 1001},
     "rules": [], "route": "ip rule 101: fwmark 0x100/0x100 lookup 101", "proxy": None},
    {"n": "4", "netns": "hc-u-istio-system-ztunnel-node-a", "node": "node-a", "iface": "pistioout", "dir": "in",
     "src": "10.0.1.3:40000", "dst": "10.96.0.10:8000", "proto": "tcp", "encap": None,
     "rules": ["mangle PREROUTING -i pistioout -j TPROXY --on-port 15001 --tproxy-mark 0x400/0xfff"],
     "route": "table 100", "proxy": None},
    {"n": "5", "netns": "hc-u-istio-system-ztunnel-node-a", "node": "node-a", "iface": "eth0", "dir": "in",
     "src": "10.0.1.3:40000", "dst": "10.96.0.10:8000", "proto": "tcp", "encap": None, "rules": [], "route": "",
     "proxy": {"component": "ztunnel-node-a", "listener": "15001"}},
    {"n": "6", "netns": "hc-u-fabric", "node": None, "iface": "node-b", "dir": "out", "src": "10.0.1.3:41000",
     "dst": "10.0.2.3:80", "proto": "tcp", "encap": None, "rules": [], "route": "", "proxy": None},
    {"n": "7", "netns": "hc-u-bar-httpbin", "node": "node-b", "iface": "eth0", "dir": "in", "src": "10.0.1.3:41000",
     "dst": "10.0.2.3:80", "proto": "tcp", "encap": None, "rules": [], "route": "",
     "proxy": {"component": "httpbin.bar-sidecar", "listener": "15006"}},
    {"n": "8", "netns": "hc-u-bar-httpbin", "node": "node-b", "iface": "lo", "dir": "in", "src": "127.0.0.6:42000",
     "dst": "10.0.2.3:80", "proto": "tcp", "encap": None, "rules": [], "route": "", "proxy": None},
]


def plan_of(topology: str, lab: str = "hc-u"):
    return build_plan(load_topology(topology), lab=lab, tunnel="userspace")


def svg_of(tmp_path: Path, plan, hops=None) -> tuple[str, list[str]]:
    out = tmp_path / "d.svg"
    diagram.render(diagram.build_dot(plan, hops), str(out))
    text = out.read_text()
    ET.fromstring(text)  # valid XML or this raises
    return text, diagram.svg_texts(text)


def joined(texts: list[str]) -> str:
    return "\n".join(texts)


@needs_dot
@pytest.mark.parametrize("topology", ["ambient-to-sidecar", "sidecar-to-ambient", "ambient-to-ambient",
                                      "coexistence"])
def test_every_node_pod_tunnel_and_service_is_drawn(tmp_path: Path, topology: str) -> None:
    plan = plan_of(topology)
    _, texts = svg_of(tmp_path, plan)
    seen = joined(texts)
    for node in plan.nodes:
        assert any(t.startswith(f"{node.name} · netns {node.netns} · {node.ip}") for t in texts), node.name
    for pod in plan.pods:
        assert pod.ref in texts, pod.ref
        assert f"{pod.ip} · {pod.mode}" in texts
    for svc in plan.services:
        assert f"service {svc.name}.{svc.namespace}" in texts and f"VIP {svc.vip}" in seen
    assert texts.count("istioout") == len(plan.nodes) and texts.count("pistioout") == len(plan.nodes)
    assert texts.count("istioin") == len(plan.nodes) and texts.count("pistioin") == len(plan.nodes)
    assert "VNI 1001" in seen and "VNI 1000" in seen
    assert "fabric bridge br0" in seen


@needs_dot
def test_proxy_ports_by_mode(tmp_path: Path) -> None:
    dot = diagram.build_dot(plan_of("sidecar-to-ambient"))
    # sleep (sidecar) shows 15001/15006, ztunnels 15001/15006/15008, the waypoint 15008
    assert 'PORT="p15001"' in dot and 'PORT="p15006"' in dot and 'PORT="p15008"' in dot
    assert dot.count('PORT="pistioout"') == 4
    _, texts = svg_of(tmp_path, plan_of("sidecar-to-ambient"))
    assert texts.count("15008") == 5  # four ztunnels + one waypoint
    assert texts.count("15006") == 5  # four ztunnels + the sleep sidecar


@needs_dot
def test_trace_hops_are_numbered_and_annotated(tmp_path: Path) -> None:
    svg, texts = svg_of(tmp_path, plan_of("ambient-to-sidecar"), S1_HOPS)
    seen = joined(texts)
    for h in S1_HOPS:
        assert f"({h['n']})" in seen, h["n"]
    assert "mark 0x100" in seen and "table 101" in seen and "geneve VNI 1001" in seen
    assert "ztunnel-node-a :15001" in seen and "httpbin.bar-sidecar :15006" in seen
    assert "#d62728" in svg  # drawn in the trace colour


def test_hop_anchors_point_at_tunnels_and_listeners() -> None:
    plan = plan_of("ambient-to-sidecar")
    a = [diagram.hop_anchor(h, plan) for h in S1_HOPS]
    assert a[2] == "tun_node_a_istioout"
    assert a[3] == "pod_istio_system_ztunnel_node_a:pistioout"
    assert a[4] == "pod_istio_system_ztunnel_node_a:p15001"
    assert a[5] == "fabric"
    assert a[6] == "pod_bar_httpbin:p15006"
    assert diagram.hop_anchor({"n": "x", "netns": "elsewhere"}, plan) is None


def test_dot_output_needs_no_graphviz(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.dot"
    rc = diagram.run_cli(argparse.Namespace(target="ambient-to-sidecar", output=str(out), trace=None))
    assert rc == 0 and out.read_text().startswith("digraph netlab {")
    assert "2 nodes, 4 pods" in capsys.readouterr().out


def test_trace_needs_a_running_lab(tmp_path: Path, monkeypatch) -> None:
    from netlab.errors import UsageError

    monkeypatch.setenv("NETLAB_RUN_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="running lab"):
        diagram.run_cli(argparse.Namespace(target="ambient-to-sidecar", output=str(tmp_path / "x.svg"),
                                           trace=["sleep", "httpbin.bar:8000"]))
