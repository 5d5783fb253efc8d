"""Where everything goes in a lab figure: node boxes holding their pods and their own namespace,
interface and listener chips, the fabric, and a traced request as numbered arrows.

Why a layout of our own instead of Graphviz: the figure the seed article draws is a fixed grammar
(a node is a box; its pods sit in a row inside it; the node's own namespace is the strip below
them; each pod's ``eth0`` faces its veth on the node; ``pistioin``/``pistioout`` face
``istioin``/``istioout``; the fabric runs under all nodes). Graphviz places those boxes as it
likes, draws the node's namespace outside its own node, and fails outright (``routesplines``)
when edges end inside clusters. Here every chip has a fixed column, so an arrow between two chips
is a short orthogonal route through the band of the box both belong to (a pod, a node's own
namespace, or the fabric), and every arrow gets a lane and a port of its own: no two arrows share
a segment, and no hop number covers another or a chip.

Nothing here assumes the 1.18 objects exist: chips come from the plan's links and from the
interfaces and listeners the trace saw, so a datapath without Geneve devices (in-pod redirection:
ztunnel's listeners inside each pod) draws with no change.

Pure code (no root, no lab): :func:`layout` takes a plan and optional hop dicts
(``TraceResult.to_dict()["hops"]``) and returns a :class:`Figure`; :mod:`netlab.verify.diagram`
writes it as SVG.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from netlab.verify.figure import CHIP_H, SANS, Arrow, Badge, Box, Chip, ChipKey, Figure, Hop, Label, Rect, Wire

LANE = 10.0
COL_GAP = 30.0  # room beside each chip for its hop numbers  # vertical distance between two arrows' horizontal runs
POD_MIN_W = 150.0
POD_GAP = 18.0
NODE_GAP = 34.0
NODE_PAD = 14.0
MARGIN = 20.0
PROXY_PORTS: dict[str, tuple[tuple[int, str], ...]] = {  # listeners the seed's figures show per pod kind
    "sidecar": ((15001, "out"), (15006, "in")),
    "ztunnel": ((15001, "out"), (15006, "in"), (15008, "hbone")),
    "waypoint": ((15008, "hbone"),),
}
MODE_COLOURS = {"ambient": "#cfe8ff", "sidecar": "#ffe0b3", "plain": "#ececec", "ztunnel": "#c9efc9",
                "waypoint": "#e8d5f5"}
_PORT_WORDS = {"outbound": "out", "inbound": "in", "inbound_passthrough": "in", "hbone": "hbone"}


# ---- which chip a hop happened at ------------------------------------------------------------------
def listener_port(hop: Hop) -> int | None:
    proxy = hop.get("proxy") or {}
    m = re.search(r"(\d+)$", str(proxy.get("listener") or "")) if isinstance(proxy, dict) else None
    return int(m.group(1)) if m else None


def hop_key(hop: Hop) -> ChipKey | None:
    """``(netns, iface)`` for a packet, ``(netns, "listen:<port>")`` for a proxy leg."""
    netns = str(hop.get("netns") or "")
    if not netns:
        return None
    if hop.get("kind") == "proxy":
        port = listener_port(hop)
        return (netns, f"listen:{port}") if port else None
    iface = hop.get("iface")
    return (netns, str(iface)) if iface else None


def hop_text(hop: Hop, numbered: bool) -> str:
    """The figure's number for a hop: the seed's ``(4)`` where the contract matched it; the
    observed position when the trace has no contract at all; else empty (a small dot)."""
    if hop.get("seed_n"):
        return f"({hop['seed_n']})"
    return str(hop.get("n", "")) if numbered else ""


# ---- collecting the chips ------------------------------------------------------------------------
@dataclass
class _Column:
    pod_chip: Chip | None
    host_chip: Chip | None

    @property
    def width(self) -> float:
        return max(c.width for c in (self.pod_chip, self.host_chip) if c is not None) + COL_GAP


@dataclass
class _PodModel:
    pod: Any
    columns: list[_Column]
    inner: list[Chip]
    width: float = 0.0


@dataclass
class _NodeModel:
    node: Any
    pods: list[_PodModel]
    extra: list[_Column]  # node interfaces without a pod across (unpaired tunnels, ...)
    uplink: Chip


def _pod_order(p: Any) -> int:
    return {"ztunnel": 2, "waypoint": 1}.get(p.mode, 0)


def _model(plan: Any, hops: Sequence[Hop]) -> list[_NodeModel]:
    seen: dict[str, dict[str, Hop]] = {}
    for h in hops:
        k = hop_key(h)
        if k:
            seen.setdefault(k[0], {}).setdefault(k[1], h)
    ifaces: dict[str, list[str]] = {}
    tunnels: dict[ChipKey, Any] = {}
    for lk in plan.links:
        ifaces.setdefault(lk.netns, []).append(lk.name)
        if lk.peer_netns and lk.peer_name:
            ifaces.setdefault(lk.peer_netns, []).append(lk.peer_name)
        if lk.kind in ("tap", "geneve"):
            tunnels[(lk.netns, lk.name)] = lk
    host_of = {(lk.peer_netns, lk.peer_name): lk.name for lk in plan.links if lk.kind == "veth" and lk.peer_netns}

    def tunnel_tip(netns: str, name: str) -> str:
        lk = tunnels[(netns, name)]
        kind = "Geneve" if lk.kind == "geneve" else "Geneve (userspace, TAP)"
        return f"{name} in {netns}: {kind} VNI {lk.vni}, remote {lk.remote}"

    out: list[_NodeModel] = []
    for node in plan.nodes:
        used: set[str] = {"eth0", "lo"}
        pods: list[_PodModel] = []
        for pod in sorted((p for p in plan.pods if p.node == node.name), key=_pod_order):
            names = [n for n in ifaces.get(pod.netns, []) if n != "lo"]
            names += [n for n in seen.get(pod.netns, {}) if not n.startswith("listen:") and n != "lo"]
            names = sorted(dict.fromkeys(names), key=lambda n: (n != "eth0", n))
            cols: list[_Column] = []
            for name in names:
                is_tun = (pod.netns, name) in tunnels
                pc = Chip((pod.netns, name), name, "pod-edge", "tunnel" if is_tun else "iface",
                          tunnel_tip(pod.netns, name) if is_tun else f"{name} in {pod.netns} ({pod.ip})")
                hc = None
                peer = host_of.get((pod.netns, name))
                if peer is None and is_tun:  # the node's end of the same tunnel: same VNI
                    vni = tunnels[(pod.netns, name)].vni
                    peer = next((n for (ns, n), lk in tunnels.items() if ns == node.netns and lk.vni == vni), None)
                if peer is not None and peer not in used:
                    used.add(peer)
                    tun = (node.netns, peer) in tunnels
                    hc = Chip((node.netns, peer), peer, "host-top", "tunnel" if tun else "iface",
                              tunnel_tip(node.netns, peer) if tun else f"{peer} in {node.netns}: veth to {pod.ref}")
                cols.append(_Column(pc, hc))
            kind = pod.mode  # in-pod, ztunnel listens inside each enrolled pod, not in its own (reference §3.2)
            if plan.datapath == "inpod":
                kind = {"ambient": "ztunnel", "ztunnel": ""}.get(kind, kind)
            ports = dict(PROXY_PORTS.get(kind, ()))
            for n, h in seen.get(pod.netns, {}).items():
                if n.startswith("listen:"):
                    word = str((h.get("proxy") or {}).get("listener") or "").rpartition(":")[0]
                    ports.setdefault(int(n[7:]), _PORT_WORDS.get(word, word[:6]))
            inner = [Chip((pod.netns, f"listen:{p}"), f"{p} {w}".strip(), "pod-inner", "listener",
                          f"{pod.ref}: listener {p} ({w})") for p, w in sorted(ports.items())]
            if pod.mode in ("sidecar", "waypoint") or "lo" in seen.get(pod.netns, {}):
                inner.append(Chip((pod.netns, "lo"), "lo", "pod-inner", "lo", f"lo in {pod.netns}"))
            pods.append(_PodModel(pod, cols, inner))
        rest = [n for n in ifaces.get(node.netns, []) if n not in used]
        rest += [n for n in seen.get(node.netns, {}) if n not in used]
        extra = []
        for name in dict.fromkeys(rest):
            tun = (node.netns, name) in tunnels
            extra.append(_Column(None, Chip((node.netns, name), name, "host-top", "tunnel" if tun else "iface",
                                            tunnel_tip(node.netns, name) if tun else f"{name} in {node.netns}")))
        uplink = Chip((node.netns, "eth0"), f"eth0 {node.ip}", "host-bottom", "uplink", f"eth0 in {node.netns}: {node.ip}")
        out.append(_NodeModel(node, pods, extra, uplink))
    return out


# ---- placing boxes and chips --------------------------------------------------------------------
def layout(plan: Any, hops: Sequence[Hop] = (), title: str | None = None) -> Figure:
    """The whole figure: boxes, chips, wires, then the trace's arrows and numbered badges."""
    hops = [h for h in hops if isinstance(h, dict)]
    fig = Figure(0, 0, title or f"{plan.lab} (topology {plan.topology}, " + (
        "datapath inpod)" if plan.datapath == "inpod" else f"tunnel {plan.tunnel})"), hops=list(hops))
    nodes = _model(plan, hops)
    routes = _plan_routes(nodes, hops, plan)
    # one lane per route of a band is an upper bound (lanes are shared once x is known)
    lanes_pod, lanes_host, lanes_fab = (max([*_per_band(routes, band).values(), 1]) for band in ("pod", "host", "fabric"))

    # vertical rhythm (the same for every node so the host strips line up)
    node_top = 58.0
    pod_top = node_top + 40
    inner_y = pod_top + 52
    pod_band = (inner_y + CHIP_H + 6, inner_y + CHIP_H + 6 + lanes_pod * LANE + 6)
    pod_bottom = pod_band[1] + 4
    host_top = pod_bottom + 46
    host_band = (host_top + CHIP_H / 2 + 8, host_top + CHIP_H / 2 + 8 + lanes_host * LANE + 4)
    host_bottom = host_band[1] + 22
    node_bottom = host_bottom + CHIP_H / 2 + 12
    fab_band = (node_bottom + 10, node_bottom + 10 + lanes_fab * LANE + 4)
    bar_y = fab_band[1] + 12

    x = MARGIN
    for nm in nodes:
        nx = x
        px = nx + NODE_PAD
        for pm in nm.pods:
            cols_w = sum(c.width for c in pm.columns)
            inner_w = sum(c.width + 8 for c in pm.inner) + 8
            name_w = max(len(pm.pod.ref) * SANS + 16, (len(pm.pod.ip) + len(pm.pod.mode) + 3) * SANS * 11 / 12 + 16)
            pm.width = max(POD_MIN_W, cols_w + 12, inner_w, name_w)
            _place_pod(fig, pm, px, pod_top, inner_y, pod_bottom, host_top)
            px += pm.width + POD_GAP
        for col in nm.extra:
            assert col.host_chip is not None
            col.host_chip.rect = _chip_rect(px + col.width / 2, host_top, col.host_chip)
            fig.chips[col.host_chip.key] = col.host_chip
            px += col.width
        host_title = f"{nm.node.name}'s own netns {nm.node.netns}"
        width = max(px - nx - POD_GAP + NODE_PAD, len(host_title) * SANS * 10 / 12 + nm.uplink.width + 8 * NODE_PAD,
                    len(_node_sub(nm.node)) * SANS * 10 / 12 + 2 * NODE_PAD, 200)
        fig.boxes.append(Box("node", Rect(nx, node_top, width, node_bottom - node_top), "#ffffff", nm.node.name,
                             f"node {nm.node.name}"))
        fig.labels.append(Label(nm.node.name, nx + 10, node_top + 17, 13, bold=True, cls="node-title"))
        fig.labels.append(Label(_node_sub(nm.node), nx + 10, node_top + 32, 10, cls="sub"))
        host = Rect(nx + 8, host_top, width - 16, host_bottom - host_top)
        fig.boxes.append(Box("host", host, "#f3f3f3", nm.node.netns, f"{nm.node.name}'s own network namespace"))
        fig.labels.append(Label(host_title, host.x + 8, host_bottom - 7, 10, cls="sub"))
        nm.uplink.rect = _chip_rect(host.right - 48 - nm.uplink.width / 2, host_bottom, nm.uplink)
        fig.chips[nm.uplink.key] = nm.uplink
        x = nx + width + NODE_GAP

    width = max(x - NODE_GAP + MARGIN, 640)
    fabric_ns = next((n.name for n in plan.netns if n.role == "fabric"), "fabric")
    bar = Rect(MARGIN, bar_y, width - 2 * MARGIN, 24)
    fig.boxes.append(Box("fabric", bar, "#e4e4e4", fabric_ns, f"fabric bridge br0 in {fabric_ns}"))
    fig.labels.append(Label(f"fabric: bridge br0 in netns {fabric_ns} · {_fabric_cidr(plan)}".rstrip(" ·"),
                            bar.x + 8, bar.y + 16, 11, cls="sub"))
    for nm in nodes:
        up = nm.uplink.rect
        port = Chip((fabric_ns, nm.node.name), nm.node.name, "fabric", "port", f"{nm.node.name} in {fabric_ns}: "
                    f"the fabric's end of {nm.node.name}'s eth0")
        port.rect = Rect(up.cx - port.width / 2, bar.y + 2, port.width, CHIP_H)
        fig.chips[port.key] = port
        fig.wires.append(Wire([(up.cx, up.bottom), (up.cx, port.rect.y)], "uplink"))
        fig.labels.append(Label(port.label, port.rect.cx, port.rect.y + 14, 11, anchor="middle", cls="chip-t", mono=True))
    y = _services_and_legend(fig, plan, bar.bottom + 18, width)
    fig.width, fig.height = width, y + MARGIN
    bands = {"pod": pod_band, "host": host_band, "fabric": fab_band}
    _draw_routes(fig, routes, bands)
    _place_badges(fig, hops)
    return fig


def _node_sub(node: Any) -> str:
    return f"netns {node.netns} · eth0 {node.ip} · pods {node.pod_cidr}"


def _fabric_cidr(plan: Any) -> str:
    nodes = {n.netns for n in plan.nodes}
    for a in plan.addresses:
        if a.netns in nodes and a.dev == "eth0":
            return str(ipaddress.ip_interface(f"{a.ip}/{a.prefixlen}").network)
    return ""


def _chip_rect(cx: float, cy: float, chip: Chip) -> Rect:
    return Rect(cx - chip.width / 2, cy - CHIP_H / 2, chip.width, CHIP_H)


def _place_pod(fig: Figure, pm: _PodModel, px: float, top: float, inner_y: float, bottom: float,
               host_top: float) -> None:
    pod = pm.pod
    rect = Rect(px, top, pm.width, bottom - top)
    fig.boxes.append(Box("pod", rect, MODE_COLOURS.get(pod.mode, "#ffffff"), pod.ref,
                         f"pod {pod.ref} · {pod.ip} · {pod.mode} · netns {pod.netns}"))
    fig.labels.append(Label(pod.ref, px + 8, top + 16, 12, bold=True, cls="pod-title"))
    fig.labels.append(Label(f"{pod.ip} · {pod.mode}", px + 8, top + 31, 11, cls="sub"))
    app = f"app {pod.app}" + (f" :{','.join(map(str, pod.ports))}" if pod.ports else "")
    if pod.mode not in ("ztunnel", "waypoint"):
        fig.labels.append(Label(app, px + 8, top + 45, 10, cls="sub"))
    ix = px + 8
    for c in pm.inner:
        c.rect = Rect(ix, inner_y, c.width, CHIP_H)
        fig.chips[c.key] = c
        ix += c.width + 8
    cx = px + (pm.width - sum(c.width for c in pm.columns)) / 2
    for col in pm.columns:
        mid = cx + col.width / 2
        assert col.pod_chip is not None
        col.pod_chip.rect = _chip_rect(mid, bottom, col.pod_chip)
        fig.chips[col.pod_chip.key] = col.pod_chip
        if col.host_chip is not None:
            col.host_chip.rect = _chip_rect(mid, host_top, col.host_chip)
            fig.chips[col.host_chip.key] = col.host_chip
            tun = col.pod_chip.kind == "tunnel"
            fig.wires.append(Wire([(mid, bottom + CHIP_H / 2), (mid, host_top - CHIP_H / 2)], "tunnel" if tun else "veth"))
            if tun:
                vni = re.search(r"VNI (\d+)", col.pod_chip.tip)
                if vni:
                    fig.labels.append(Label(f"VNI {vni.group(1)}", mid + 4, (bottom + host_top) / 2 + 4, 9, cls="vni"))
        cx += col.width


def _services_and_legend(fig: Figure, plan: Any, y: float, width: float) -> float:
    x = MARGIN
    for svc in plan.services:
        port = f"{svc.port} → {svc.target_port}" if svc.port != svc.target_port else str(svc.port)
        lines = [f"service {svc.name}.{svc.namespace}", f"VIP {svc.vip}:{port}", "→ " + ", ".join(svc.endpoints)]
        w = max(len(s) for s in lines) * SANS * 10 / 12 + 18
        if x + w > width - MARGIN and x > MARGIN:
            x, y = MARGIN, y + 58
        fig.boxes.append(Box("service", Rect(x, y, w, 48), "#fffbe6", f"{svc.namespace}/{svc.name}"))
        for i, s in enumerate(lines):
            fig.labels.append(Label(s, x + 8, y + 15 + i * 13, 10, bold=i == 0, cls="sub"))
        x += w + 12
    keys = list(MODE_COLOURS.items())
    w = sum(len(k) * SANS * 10 / 12 + 30 for k, _ in keys) + 60
    if x + w > width - MARGIN and x > MARGIN:
        x, y = MARGIN, y + 58
    fig.labels.append(Label("pod mode:", x, y + 28, 10, cls="sub"))
    lx = x + 60
    for mode, colour in keys:
        fig.boxes.append(Box("legend", Rect(lx, y + 18, 14, 14), colour, mode))
        fig.labels.append(Label(mode, lx + 18, y + 29, 10, cls="sub"))
        lx += len(mode) * SANS * 10 / 12 + 30
    return y + 50


# ---- routing the trace ---------------------------------------------------------------------------
@dataclass
class _Route:
    n: int
    a: ChipKey
    b: ChipKey
    band: Literal["pod", "host", "fabric", "direct"]
    band_key: str
    encap: bool
    lane: int = 0


def _where(nodes: list[_NodeModel], plan: Any) -> dict[ChipKey, tuple[str, str, str]]:
    """chip -> (node, container netns, place)."""
    out: dict[ChipKey, tuple[str, str, str]] = {}
    for nm in nodes:
        for pm in nm.pods:
            for col in pm.columns:
                if col.pod_chip:
                    out[col.pod_chip.key] = (nm.node.name, pm.pod.netns, "pod-edge")
                if col.host_chip:
                    out[col.host_chip.key] = (nm.node.name, nm.node.netns, "host-top")
            for c in pm.inner:
                out[c.key] = (nm.node.name, pm.pod.netns, "pod-inner")
        for col in nm.extra:
            if col.host_chip:
                out[col.host_chip.key] = (nm.node.name, nm.node.netns, "host-top")
        out[nm.uplink.key] = (nm.node.name, nm.node.netns, "host-bottom")
    fabric_ns = next((n.name for n in plan.netns if n.role == "fabric"), "fabric")
    for nm in nodes:
        out[(fabric_ns, nm.node.name)] = (nm.node.name, fabric_ns, "fabric")
    return out


def _plan_routes(nodes: list[_NodeModel], hops: Sequence[Hop], plan: Any) -> list[_Route]:
    where = _where(nodes, plan)
    tunnels = {(lk.netns, lk.name) for lk in plan.links if lk.kind in ("tap", "geneve")}
    column_of: dict[ChipKey, ChipKey] = {}
    for nm in nodes:
        for pm in nm.pods:
            for col in pm.columns:
                if col.pod_chip and col.host_chip:
                    column_of[col.pod_chip.key] = col.host_chip.key
                    column_of[col.host_chip.key] = col.pod_chip.key
    routes: list[_Route] = []
    prev: ChipKey | None = None
    prev_frame = False
    for h in hops:
        k = hop_key(h)
        if k is None or k not in where:
            continue
        # a Geneve frame on an underlay interface (not the tunnel device itself): the arrows
        # into and out of it carry the encapsulated packet and are drawn dashed
        frame = bool(h.get("encap")) and k not in tunnels
        if prev is not None and prev != k:
            (na, ca, pa), (nb, cb, pb) = where[prev], where[k]
            enc = frame or prev_frame
            n = int(h.get("n") or 0)
            if column_of.get(prev) == k:
                routes.append(_Route(n, prev, k, "direct", "", enc))
            elif ca == cb and pa.startswith("pod"):
                routes.append(_Route(n, prev, k, "pod", ca, enc))
            elif na == nb and "fabric" not in (pa, pb):
                routes.append(_Route(n, prev, k, "host", na, enc))
            else:
                routes.append(_Route(n, prev, k, "fabric", "fabric", enc))
        prev, prev_frame = k, frame
    return routes


def _per_band(routes: list[_Route], band: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in routes:
        if r.band == band:
            out[r.band_key] = out.get(r.band_key, 0) + 1
    return out


def _ports(fig: Figure, routes: list[_Route], bands: dict[str, tuple[float, float]]) -> dict[tuple[int, ChipKey], float]:
    """Each route end's x on its chip: ends on the same side of a chip (above it or below it) are
    spread apart, so two arrows never run down the same line."""
    sides: dict[tuple[ChipKey, bool], list[tuple[int, ChipKey]]] = {}
    for r in routes:
        for key in (r.a, r.b):
            c = fig.chips[key]
            if r.band == "direct":
                below = c.place == "pod-edge"
            else:
                lo, hi = bands[r.band]
                below = c.rect.cy < (lo + hi) / 2
            sides.setdefault((key, below), []).append((r.n, key))
    out: dict[tuple[int, ChipKey], float] = {}
    for (key, _), ends in sides.items():
        rect = fig.chips[key].rect
        k = len(ends)
        step = min(9.0, (rect.w - 8) / max(k, 1))
        for i, end in enumerate(ends):
            out[end] = rect.cx + (i - (k - 1) / 2) * step
    return out


def _draw_routes(fig: Figure, routes: list[_Route], bands: dict[str, tuple[float, float]]) -> None:
    ports = _ports(fig, routes, bands)
    lanes: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    for r in routes:
        a, b = fig.chips[r.a].rect, fig.chips[r.b].rect
        xa, xb = ports[(r.n, r.a)], ports[(r.n, r.b)]
        if r.band == "direct":
            x = xa
            ya, yb = (a.bottom, b.y) if a.cy < b.cy else (a.y, b.bottom)
            fig.arrows.append(Arrow(r.n, [(x, ya), (x, yb)], r.encap))
            continue
        lo, hi = bands[r.band]
        span = (min(xa, xb) - 7, max(xa, xb) + 7)
        used = lanes.setdefault((r.band, r.band_key), [])
        lane = next((i for i, spans in enumerate(used) if all(span[1] < s[0] or s[1] < span[0] for s in spans)), len(used))
        if lane == len(used):
            used.append([])
        used[lane].append(span)
        y = lo + 4 + lane * LANE
        y = min(y, hi - 2)
        ya = a.bottom if a.cy < y else a.y
        yb = b.bottom if b.cy < y else b.y
        fig.arrows.append(Arrow(r.n, [(xa, ya), (xa, y), (xb, y), (xb, yb)], r.encap))


# ---- numbered badges -----------------------------------------------------------------------------
def _segments(fig: Figure) -> list[Rect]:
    out = []
    for arrow in fig.arrows:
        for (x1, y1), (x2, y2) in itertools.pairwise(arrow.points):
            out.append(Rect(min(x1, x2) - 2, min(y1, y2) - 2, abs(x2 - x1) + 4, abs(y2 - y1) + 4))
    return out


def _candidates(c: Rect, w: float, h: float) -> Iterable[tuple[float, float]]:
    """Positions around a chip, nearest first: beside it, then above/below, then further out."""
    for d in (3.0, 9.0, 16.0, 26.0, 38.0, 52.0):
        yield c.right + d, c.cy - h / 2
        yield c.x - d - w, c.cy - h / 2
        yield c.cx - w / 2, c.y - d - h
        yield c.cx - w / 2, c.bottom + d
        yield c.right + d, c.y - d - h
        yield c.x - d - w, c.y - d - h
        yield c.right + d, c.bottom + d
        yield c.x - d - w, c.bottom + d


def _place_badges(fig: Figure, hops: Sequence[Hop]) -> None:
    numbered = not any(h.get("seed_n") for h in hops)
    obstacles = [c.rect for c in fig.chips.values()] + [lb.rect for lb in fig.labels] + _segments(fig)
    obstacles += [b.rect for b in fig.boxes if b.kind in ("service", "legend")]
    for h in hops:
        k = hop_key(h)
        if k is None or k not in fig.chips:
            continue
        n = int(h.get("n") or 0)
        fig.anchors[n] = k
        text = hop_text(h, numbered)
        w, ht = (len(text) * 7.2 + 10, 18.0) if text else (9.0, 9.0)
        chip = fig.chips[k].rect
        spot = None
        for x, y in _candidates(chip, w, ht):
            r = Rect(x, y, w, ht)
            if r.x >= 2 and r.y >= 40 and r.right <= fig.width - 2 and not any(r.overlaps(o, 1.5) for o in obstacles):
                spot = r
                break
        if spot is None:  # crowded beyond reason: stack to the right of everything else at this chip
            taken = [b.rect for b in fig.badges if b.chip == k]
            spot = Rect(max([chip.right + 3] + [t.right + 3 for t in taken]), chip.cy - ht / 2, w, ht)
        fig.badges.append(Badge(n, text, spot, bool(h.get("seed_n")), k))
        obstacles.append(spot)


__all__ = ["MODE_COLOURS", "Figure", "hop_key", "hop_text", "layout", "listener_port"]
