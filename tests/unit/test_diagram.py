"""Figures of topologies (no root, no lab): every node a box holding its pods and its own
namespace, every hop of every shipped path drawn at its interface or listener with its number,
and no two arrows or numbers on top of each other.

The hops here are built from the topologies' hop contracts (what a matching trace reports for
those hops), so every shipped path is drawn; tests/kernel/test_diagram.py draws real traces.
"""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from netlab.plan.build import build_plan
from netlab.topology.load import load_topology
from netlab.verify import diagram
from netlab.verify.figure import Figure, Rect
from netlab.verify.hops import Geography
from netlab.verify.layout import layout

TOPOLOGIES = sorted(p.stem for p in (Path(__file__).parents[2] / "topologies").glob("*.yaml"))
PATHS = [(t, p.name) for t in TOPOLOGIES for p in load_topology(t).paths if p.hops]


def plan_of(topology: str, lab: str = "hc-u", tunnel: str = "userspace") -> Any:
    return build_plan(load_topology(topology), lab=lab, tunnel=tunnel)


def contract_hops(plan: Any, path_name: str) -> list[dict[str, Any]]:
    """The hop dicts a trace that matched every contract hop would report for them."""
    geo = Geography(plan)
    sym = {(ns, s): iface for (ns, iface), s in geo.sym.items()}
    path = next(p for p in plan.paths if p.name == path_name)
    out = []
    for i, h in enumerate(path.hops, 1):
        netns = next(ns for ns, place in geo.places.items()
                     if place.at == h.at or (h.at.startswith("waypoint:") and place.at.startswith(h.at + "/")))
        d: dict[str, Any] = {"n": i, "seed_n": h.n, "at": h.at, "netns": netns, "src": "10.0.1.3:20000",
                             "dst": f"10.0.2.3:{h.port or 80}", "rules": list(h.rules), "route": "", "mark": None,
                             "encap": None, "what": h.what}
        if h.listener:
            d.update(kind="proxy", proxy={"component": "x", "listener": f"in:{h.listener.split(':')[1]}"})
        else:
            d.update(kind="packet", iface=sym.get((netns, h.iface or ""), h.iface), iface_sym=h.iface, dir=h.dir)
        out.append(d)
    return out


def segments(fig: Figure) -> list[tuple[int, tuple[float, float], tuple[float, float]]]:
    return [(a.n, p, q) for a in fig.arrows for p, q in itertools.pairwise(a.points)]


def overlapping(s: tuple[tuple[float, float], tuple[float, float]], t: tuple[tuple[float, float], tuple[float, float]]) -> bool:
    """Two axis-parallel segments lying on the same line and sharing more than a point."""
    (a, b), (c, d) = s, t
    if a[0] == b[0] == c[0] == d[0]:
        lo, hi = max(min(a[1], b[1]), min(c[1], d[1])), min(max(a[1], b[1]), max(c[1], d[1]))
        return hi - lo > 0.5
    if a[1] == b[1] == c[1] == d[1]:
        lo, hi = max(min(a[0], b[0]), min(c[0], d[0])), min(max(a[0], b[0]), max(c[0], d[0]))
        return hi - lo > 0.5
    return False


def inside(r: Rect, outer: Rect) -> bool:
    return outer.x <= r.x and outer.y <= r.y and r.right <= outer.right and r.bottom <= outer.bottom


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_each_node_box_holds_its_pods_and_its_own_namespace(topology: str) -> None:
    plan = plan_of(topology)
    fig = layout(plan)
    nodes = {b.ref: b.rect for b in fig.boxes if b.kind == "node"}
    assert set(nodes) == {n.name for n in plan.nodes}
    for n in plan.nodes:
        host = next(b.rect for b in fig.boxes if b.kind == "host" and b.ref == n.netns)
        assert inside(host, nodes[n.name]), n.name
        for p in plan.pods:
            if p.node == n.name:
                pod = next(b.rect for b in fig.boxes if b.kind == "pod" and b.ref == p.ref)
                assert inside(pod, nodes[n.name]), p.ref
                assert pod.bottom < host.y  # the pods sit above their node's own namespace
    for a, b in itertools.combinations(nodes.values(), 2):
        assert not a.overlaps(b)
    chips = [c.rect for c in fig.chips.values()]
    for a, b in itertools.combinations(chips, 2):
        assert not a.overlaps(b), (a, b)
    svg = diagram.to_svg(fig)
    texts = diagram.svg_texts(svg)
    for p in plan.pods:
        assert p.ref in texts
    if any(lk.kind in ("tap", "geneve") for lk in plan.links):
        assert {"istioin", "istioout", "pistioin", "pistioout"} <= set(texts)


@pytest.mark.parametrize(("topology", "path"), PATHS)
def test_every_shipped_path_is_drawn_with_every_hop_number(topology: str, path: str) -> None:
    plan = plan_of(topology)
    hops = contract_hops(plan, path)
    fig = layout(plan, hops, f"{topology} {path}")
    assert sorted(fig.anchors) == [h["n"] for h in hops]  # every hop has a place in the figure
    svg = diagram.to_svg(fig, table=True)
    ET.fromstring(svg)
    texts = diagram.svg_texts(svg)
    for h in hops:
        assert f"({h['seed_n']})" in texts, h  # the seed's number on the figure
        assert re.search(rf'class="badge[^"]*" data-hop="{h["n"]}"', svg)
    # numbers never cover each other, a chip or a label; arrows never share a segment
    badges = [b.rect for b in fig.badges]
    for a, b in itertools.combinations(badges, 2):
        assert not a.overlaps(b), (a, b)
    for b in fig.badges:
        for c in fig.chips.values():
            assert not b.rect.overlaps(c.rect), (b, c.key)
    segs = segments(fig)
    for (n1, *s), (n2, *t) in itertools.combinations(segs, 2):
        assert n1 == n2 or not overlapping(tuple(s), tuple(t)), (n1, s, n2, t)  # type: ignore[arg-type]


def test_kernel_geneve_and_no_tunnels_draw_the_same_grammar() -> None:
    """Tunnels come from the plan's links (tap or geneve), not from fixed names: a plan without
    them (a plain network, or in-pod redirection) draws without any tunnel chip."""
    kernel = layout(plan_of("ambient-to-sidecar", tunnel="kernel"))
    assert {c.label for c in kernel.chips.values() if c.kind == "tunnel"} == {"istioin", "istioout", "pistioin", "pistioout"}
    plain = layout(plan_of("two-nodes"))
    assert not [c for c in plain.chips.values() if c.kind == "tunnel"]


def test_listener_seen_in_a_pod_without_a_proxy_gets_its_chip() -> None:
    """In-pod redirection: ztunnel's 15001 inside the client pod's netns. The figure draws what
    the trace saw, so a proxy hop in an ambient pod adds a listener chip there."""
    plan = plan_of("ambient-to-sidecar")
    sleep = plan.pod("foo/sleep")
    hops = [{"n": 1, "kind": "packet", "netns": sleep.netns, "iface": "lo", "dir": "out", "seed_n": "1"},
            {"n": 2, "kind": "proxy", "netns": sleep.netns, "proxy": {"listener": "outbound:15001"}, "seed_n": "2"},
            {"n": 3, "kind": "packet", "netns": sleep.netns, "iface": "eth0", "dir": "out", "seed_n": "3"}]
    fig = layout(plan, hops)
    assert (sleep.netns, "listen:15001") in fig.chips and (sleep.netns, "lo") in fig.chips
    assert sorted(fig.anchors) == [1, 2, 3] and len(fig.arrows) == 2


def test_an_inpod_lab_draws_ztunnels_listeners_in_the_enrolled_pods() -> None:
    """Under inpod ztunnel's 15001/15006/15008 are sockets in each enrolled pod (reference §3.2),
    none in ztunnel's own netns; the title says the datapath, not a tunnel that does not exist."""
    plan = build_plan(load_topology("ambient-to-ambient"), lab="hc-u", tunnel="userspace", datapath="inpod")
    fig = layout(plan)
    ports = {p: {k[1] for k in fig.chips if k[0] == plan.pod(p).netns and k[1].startswith("listen:")}
             for p in ("foo/sleep", "bar/httpbin", "istio-system/ztunnel-node-a")}
    assert ports == {"foo/sleep": {"listen:15001", "listen:15006", "listen:15008"},
                     "bar/httpbin": {"listen:15001", "listen:15006", "listen:15008"}, "istio-system/ztunnel-node-a": set()}
    assert "datapath inpod" in fig.title and "tunnel" not in fig.title
    seed = layout(plan_of("ambient-to-ambient"))
    assert (plan_of("ambient-to-ambient").pod("istio-system/ztunnel-node-a").netns, "listen:15008") in seed.chips


def test_png_and_bad_suffix(tmp_path: Path) -> None:
    svg = diagram.figure_svg(plan_of("ambient-to-sidecar"))
    with pytest.raises(Exception, match=r"\.svg, \.png or \.pdf"):
        diagram.render(svg, str(tmp_path / "x.gif"))
    import shutil

    if shutil.which("rsvg-convert"):
        diagram.render(svg, str(tmp_path / "x.png"))
        assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_svg_output_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    (tmp_path / "out.svg").symlink_to(target)
    with pytest.raises(Exception, match="cannot write"):
        diagram.render(diagram.figure_svg(plan_of("two-nodes")), str(tmp_path / "out.svg"))
    assert target.read_text() == "keep"


def test_diagram_cli_without_root_draws_a_topology(tmp_path: Path) -> None:
    from netlab.cli import main

    out = tmp_path / "t.svg"
    assert main(["diagram", "sidecar-to-ambient", "-o", str(out)]) == 0
    texts = diagram.svg_texts(out.read_text())
    assert "bar-2/waypoint" in texts and "node-d" in texts
