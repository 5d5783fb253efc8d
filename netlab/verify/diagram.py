"""``netlab diagram``: the lab (or a topology) drawn like the seed article's figures, with Graphviz.

Why generate the figure instead of drawing it once: the seed's figures are the mental model a
reader brings (nodes as boxes, pods inside, istioout/pistioout and istioin/pistioin tunnels,
proxies on 15001/15006/15008), and a figure made from the *plan* can never disagree with what
``netlab up`` built. With ``--trace`` the hops ``netlab trace`` actually observed are drawn over
it as bold numbered arrows, so a figure of the seed and one of the lab can be compared side by
side, and a wrong hop shows where the lab (or the reader's model) diverges.

Drawing is pure (:func:`build_dot` takes a plan and optional hop dicts and returns DOT text);
only :func:`render` runs ``dot`` (DOT on stdin), and only ``--trace`` needs a running lab.
"""

from __future__ import annotations

import html
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from netlab.errors import NetlabError, UsageError

MODE_COLOURS = {  # fill colours; the legend in every figure repeats them
    "ambient": "#cfe8ff",
    "sidecar": "#ffe0b3",
    "plain": "#e8e8e8",
    "ztunnel": "#c9efc9",
    "waypoint": "#e8d5f5",
}
PROXY_PORTS = {  # the listeners the seed's figures show per pod kind
    "sidecar": (("15001", "outbound"), ("15006", "inbound")),
    "ztunnel": (("15001", "outbound"), ("15006", "inbound plain"), ("15008", "inbound HBONE")),
    "waypoint": (("15008", "HBONE"),),
}
TRACE_COLOUR = "#d62728"
_MAIN_TABLES = {"253", "254", "255"}  # default/main/local: not worth a label


def _id(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9]", "_", p) for p in parts)


def _q(s: str) -> str:
    """A DOT double-quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


# ---- the base figure -------------------------------------------------------------------------------
def _pod_label(pod: Any) -> str:
    """An HTML-like table: name, IP and mode; proxy listeners and ztunnel's tunnel ends as ports
    (``p15001``, ``pistioin``...) so trace arrows can point at the very listener."""
    colour = MODE_COLOURS.get(pod.mode, "#ffffff")
    rows = [f'<TR><TD COLSPAN="3"><B>{_e(pod.ref)}</B></TD></TR>',
            f'<TR><TD COLSPAN="3">{_e(pod.ip)} · {_e(pod.mode)}</TD></TR>']
    ports = PROXY_PORTS.get(pod.mode, ())
    if ports:
        cells = "".join(f'<TD PORT="p{p}" BGCOLOR="white">{p}<BR/><FONT POINT-SIZE="8">{_e(w)}</FONT></TD>'
                        for p, w in ports)
        rows.append(f"<TR>{cells}</TR>" if len(ports) == 3 else
                    f'<TR><TD COLSPAN="3"><TABLE BORDER="0" CELLSPACING="2"><TR>{cells}</TR></TABLE></TD></TR>')
    if pod.mode == "ztunnel":
        rows.append('<TR><TD PORT="pistioin" COLSPAN="2" BGCOLOR="white">pistioin</TD>'
                    '<TD PORT="pistioout" BGCOLOR="white">pistioout</TD></TR>')
    if pod.mode not in ("ztunnel", "waypoint") and pod.ports:
        rows.append(f'<TR><TD COLSPAN="3">app {_e(pod.app)} :{_e(",".join(map(str, pod.ports)))}</TD></TR>')
    return (f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="1" CELLPADDING="3" BGCOLOR="{colour}">'
            + "".join(rows) + "</TABLE>>")


def _fabric_cidr(plan: Any) -> str:
    node_ns = {n.netns for n in plan.nodes}
    for a in plan.addresses:
        if a.netns in node_ns and a.dev == "eth0":
            return str(ipaddress.ip_interface(f"{a.ip}/{a.prefixlen}").network)
    return ""


def _tunnel_ip(plan: Any, netns: str, dev: str) -> str:
    return next((a.ip for a in plan.addresses if a.netns == netns and a.dev == dev), "")


def base_lines(plan: Any) -> list[str]:
    """Clusters per node (host netns, tunnels, pods), the fabric bridge, services and a legend."""
    out: list[str] = []
    for node in plan.nodes:
        out.append(f"subgraph {_q('cluster_' + _id(node.name))} {{")
        out.append(f"label={_q(f'{node.name} · netns {node.netns} · {node.ip} · pods {node.pod_cidr}')};")
        out.append('style="rounded"; color="#555555"; fontname="Helvetica-Bold";')
        host = _id("host", node.name)
        host_label = _q(f"{node.name} host netns\neth0 {node.ip}\ngw {node.host_ip}")
        out.append(f'{host} [shape=box, style="filled", fillcolor="#f5f5f5", label={host_label}];')
        tunnels = [lk for lk in plan.links if lk.netns == node.netns and lk.name in ("istioin", "istioout")]
        for lk in tunnels:
            tid = _id("tun", node.name, lk.name)
            vni = f"VNI {lk.vni}" if lk.vni is not None else ""
            kind = "Geneve" if lk.kind == "geneve" else "Geneve (userspace, TAP)"
            tun_label = _q(f"{lk.name}\n{kind} {vni}\n{_tunnel_ip(plan, node.netns, lk.name)}")
            out.append(f'{tid} [shape=cds, style="filled", fillcolor="#fff7cc", label={tun_label}];')
            out.append(f'{tid} -> {host} [arrowhead=none, color="#999999"];')
        for pod in (p for p in plan.pods if p.node == node.name):
            pid = _id("pod", pod.ref)
            out.append(f"{pid} [shape=plain, label={_pod_label(pod)}];")
            out.append(f'{pid} -> {host} [arrowhead=none, color="#999999", fontsize=8, '
                       f'label={_q(pod.host_veth)}, fontcolor="#777777"];')
            if pod.mode == "ztunnel":
                for lk in tunnels:
                    end = "p" + lk.name
                    vni_label = _q(f"VNI {lk.vni}")
                    out.append(f'{pid}:{end} -> {_id("tun", node.name, lk.name)} [dir=both, style=dashed, '
                               f'color="#b8860b", fontsize=8, label={vni_label}];')
        out.append("}")
    hosts = [_id("host", n.name) for n in plan.nodes]
    out.append("{rank=same; " + "; ".join(hosts) + ";}")
    out += [f"{x} -> {y} [style=invis];" for x, y in zip(hosts, hosts[1:])]  # keep topology order
    cidr = _fabric_cidr(plan)
    fabric_label = _q(f"fabric bridge br0\n{cidr}".rstrip())
    out.append(f'fabric [shape=box3d, style="filled", fillcolor="#eeeeee", label={fabric_label}];')
    for node in plan.nodes:
        out.append(f'{_id("host", node.name)} -> fabric [arrowhead=none, penwidth=2, color="#555555", fontsize=8, '
                   f'label={_q(f"eth0 ⇄ {node.name}")}];')
    for svc in plan.services:
        sid = _id("svc", svc.namespace, svc.name)
        port = f"{svc.port} → {svc.target_port}" if svc.port != svc.target_port else str(svc.port)
        svc_label = _q(f"service {svc.name}.{svc.namespace}\nVIP {svc.vip}:{port}")
        out.append(f'{sid} [shape=note, style="filled", fillcolor="#fffbe6", fontsize=10, label={svc_label}];')
        for ep in svc.endpoints:
            out.append(f'{sid} -> {_id("pod", ep)} [style=dotted, color="#bbbbbb", arrowhead=empty, '
                       f"constraint=false];")
    keys = "".join(f'<TR><TD BGCOLOR="{c}">{m}</TD></TR>' for m, c in MODE_COLOURS.items())
    out.append('legend [shape=plain, fontsize=9, label=<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" '
               f'CELLPADDING="3"><TR><TD><B>pod mode</B></TD></TR>{keys}</TABLE>>];')
    return out


# ---- the traced path -------------------------------------------------------------------------------
def _locator(plan: Any) -> dict[str, tuple[str, str]]:
    """Every name a hop may use for where it was seen -> (graph id, kind)."""
    loc: dict[str, tuple[str, str]] = {}
    for n in plan.nodes:
        loc[n.netns] = loc[n.name] = (_id("host", n.name), "node")
    for p in plan.pods:
        loc[p.netns] = loc[p.ref] = (_id("pod", p.ref), p.mode)
        loc.setdefault(p.name, (_id("pod", p.ref), p.mode))
    for ns in plan.netns:
        if ns.role == "fabric":
            loc[ns.name] = loc["fabric"] = ("fabric", "fabric")
    return loc


def _listener_port(hop: dict[str, Any]) -> str | None:
    proxy = hop.get("proxy") or {}
    text = " ".join(str(v) for v in (proxy.values() if isinstance(proxy, dict) else [proxy]))
    m = re.search(r"\b(15001|15006|15008)\b", text)
    return m.group(1) if m else None


def hop_anchor(hop: dict[str, Any], plan: Any, loc: dict[str, tuple[str, str]] | None = None) -> str | None:
    """The graph element a hop happened at (``id`` or ``id:port``); None if it is not drawn."""
    loc = loc if loc is not None else _locator(plan)
    iface = str(hop.get("iface") or "")
    place = loc.get(str(hop.get("netns") or "")) or loc.get(str(hop.get("node") or ""))
    if place is None:
        return None
    gid, kind = place
    if kind == "node":
        node = gid.removeprefix("host_")
        if iface in ("istioin", "istioout"):
            return _id("tun", next(n.name for n in plan.nodes if _id(n.name) == node), iface)
        return gid
    if kind == "ztunnel" and iface in ("pistioin", "pistioout"):
        return f"{gid}:{iface}"
    port = _listener_port(hop)
    if port and port in {p for p, _ in PROXY_PORTS.get(kind, ())}:
        return f"{gid}:p{port}"
    return gid


def annotations(hop: dict[str, Any]) -> list[str]:
    """Short facts worth printing on an arrow: marks, routing tables, encapsulation, proxy."""
    texts = [str(hop.get("mark") or "")] + [str(r) for r in (hop.get("rules") or [])] + [str(hop.get("route") or "")]
    blob = " ".join(texts)
    out: list[str] = []
    marks = list(dict.fromkeys(m.split("/")[0].lower() for m in re.findall(r"0x[0-9a-fA-F]+(?:/0x[0-9a-fA-F]+)?", blob)))
    if marks:
        out.append("mark " + ",".join(marks[:3]))
    tables = [t for t in dict.fromkeys(re.findall(r"\b(?:table|lookup)\s+(\d+)", blob)) if t not in _MAIN_TABLES]
    if tables:
        out.append("table " + ",".join(tables[:2]))
    enc = hop.get("encap") or {}
    if isinstance(enc, dict) and enc:
        vni = f" VNI {enc['vni']}" if enc.get("vni") is not None else ""
        out.append(f"{enc.get('type', 'encap')}{vni}")
    proxy = hop.get("proxy") or {}
    if isinstance(proxy, dict) and proxy.get("component"):
        lst = f" :{proxy['listener']}" if proxy.get("listener") else ""
        out.append(f"{proxy['component']}{lst}")
    return out


def hop_label(hop: dict[str, Any]) -> str:
    """``(n)``, the observed position; plus the seed's number when the contract matched one."""
    seed = hop.get("seed_n")
    return f"({hop.get('n', '?')})" + (f" seed {seed}" if seed not in (None, "", hop.get("n")) else "")


def _hop_numbers(hops: Sequence[dict[str, Any]]) -> str:
    return " ".join(hop_label(h) for h in hops)


def trace_lines(plan: Any, hops: Sequence[dict[str, Any]]) -> list[str]:
    """Bold numbered arrows: consecutive hops at the same place share one arrow into it, whose
    label lists their numbers ``(2) (3)`` and what they carried (marks, tables, VNI, proxy)."""
    loc = _locator(plan)
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for h in hops:
        a = hop_anchor(h, plan, loc)
        if a is None:
            continue
        if groups and groups[-1][0] == a:
            groups[-1][1].append(h)
        else:
            groups.append((a, [h]))
    if not groups:
        return []
    start = ('trace_start [shape=circle, style=filled, fillcolor="%s", fontcolor=white, fontsize=9, '
             'width=0.3, label="start"];' % TRACE_COLOUR)
    first = groups[0][0].split(":")[0]
    node = next((n.name for n in plan.nodes if first in (_id("host", n.name),)
                 or any(first == _id("pod", p.ref) and p.node == n.name for p in plan.pods)), None)
    # a subgraph of the same name *is* that cluster: the start dot sits in the client's node
    out = [f"subgraph {_q('cluster_' + _id(node))} {{ {start} }}" if node else start]
    prev = "trace_start"
    for anchor, hs in groups:
        notes: list[str] = []
        for h in hs:
            notes += [a for a in annotations(h) if a not in notes]
        label = "\n".join([_hop_numbers(hs), *notes])
        out.append(f'{prev} -> {anchor} [color="{TRACE_COLOUR}", fontcolor="{TRACE_COLOUR}", penwidth=2.6, '
                   f'style=bold, fontname="Helvetica-Bold", fontsize=10, label={_q(label)}];')
        prev = anchor
    return out


# ---- assembling, rendering, CLI --------------------------------------------------------------------
def build_dot(plan: Any, hops: Sequence[dict[str, Any]] | None = None, title: str | None = None) -> str:
    """The whole figure as DOT text (pure: no root, no lab)."""
    title = title or f"{plan.lab} (topology {plan.topology}, tunnel {plan.tunnel})"
    lines = ["digraph netlab {", "compound=true; rankdir=TB; nodesep=0.35; ranksep=0.6;",
             f'labelloc=t; fontname="Helvetica"; fontsize=16; label={_q(title)};',
             'node [fontname="Helvetica", fontsize=10]; edge [fontname="Helvetica", fontsize=9];']
    lines += base_lines(plan)
    if hops:
        lines += trace_lines(plan, hops)
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, output: str) -> None:
    """Write ``output`` in the format its suffix names (svg, png, pdf; .dot/.gv: the DOT text)."""
    fmt = Path(output).suffix.lstrip(".").lower() or "svg"
    if fmt in ("dot", "gv"):
        Path(output).write_text(dot_text)
        return
    if fmt not in ("svg", "png", "pdf"):
        raise UsageError(f"-o {output}: use a .svg, .png, .pdf or .dot file")
    exe = shutil.which("dot")
    if exe is None:
        raise NetlabError("graphviz `dot` is not installed (apt install graphviz); or write DOT text with -o FILE.dot")
    r = subprocess.run([exe, f"-T{fmt}", "-o", output], input=dot_text.encode(), capture_output=True, timeout=120)
    if r.returncode != 0:
        raise NetlabError(f"dot failed: {r.stderr.decode(errors='replace').strip()[:500]}")


def plan_for(target: str) -> tuple[Any, Any]:
    """(plan, lab or None): a running lab of that name, else a topology planned without root."""
    from netlab.lab import Lab

    try:
        running = target in Lab.running()
    except OSError:  # run dir not readable (not root): then it is a topology
        running = False
    if running:
        lab = Lab.attach(target)
        return lab.plan, lab
    from netlab.plan.build import build_plan
    from netlab.topology.load import load_topology, resolve

    path = resolve(target)
    topo = load_topology(path)
    return build_plan(topo, lab=topo.name, tunnel="userspace", source=str(path)), None


def traced_hops(lab: Any, src: str, dst: str) -> tuple[list[dict[str, Any]], str]:
    """Run ``netlab trace`` (imported lazily: it needs root and a lab) and return its hops."""
    from netlab.verify.trace import trace

    result = trace(lab, src, dst, None)
    d = result.to_dict() if hasattr(result, "to_dict") else result
    hops = d.get("hops", []) if isinstance(d, dict) else list(d)
    return [h for h in hops if isinstance(h, dict)], f"{src} → {dst}"


def run_cli(args: Any) -> int:
    """Entry of ``netlab diagram``."""
    plan, lab = plan_for(args.target)
    hops: list[dict[str, Any]] = []
    title = None
    if args.trace:
        if lab is None:
            raise UsageError(f"--trace needs a running lab; {args.target!r} is not up (netlab up {args.target})")
        hops, what = traced_hops(lab, *args.trace)
        title = f"{plan.lab}: trace {what} ({len(hops)} hops)"
    render(build_dot(plan, hops, title), args.output)
    extra = f", {len(hops)} hops" if args.trace else ""
    print(f"wrote {args.output}: {len(plan.nodes)} nodes, {len(plan.pods)} pods, {len(plan.services)} services{extra}")
    return 0


def svg_texts(svg: str) -> list[str]:
    """Every text run of an SVG (what a reader sees); for tests and checks."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)
    return ["".join(t.itertext()) for t in root.iter() if t.tag.endswith("text")]


__all__: Iterable[str] = ["MODE_COLOURS", "annotations", "build_dot", "hop_anchor", "plan_for", "render",
                          "run_cli", "svg_texts", "trace_lines"]
