"""``netlab diagram``: the lab (or a topology) drawn like the seed article's figures, as SVG.

Why generate the figure instead of drawing it once: the seed's figures are the mental model a
reader brings (nodes as boxes, pods inside, istioout/pistioout and istioin/pistioin tunnels,
proxies on 15001/15006/15008), and a figure made from the *plan* can never disagree with what
``netlab up`` built. With ``--trace`` the hops ``netlab trace`` actually observed are drawn over
it as numbered arrows (the seed's numbers where the path's contract matched them), so a figure of
the seed and one of the lab can be compared side by side, and a wrong hop shows where the lab (or
the reader's model) diverges.

:mod:`netlab.verify.layout` decides where everything goes; this module writes that as SVG (the
same SVG the ``--html`` page and ``netlab ui`` embed: arrows and badges carry ``data-hop`` so a
page can highlight one hop) and converts it to PNG or PDF with ``rsvg-convert``.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netlab.errors import NetlabError, UsageError
from netlab.verify.figure import Figure, Hop
from netlab.verify.layout import MODE_COLOURS, hop_key, hop_text, layout

TRACE_COLOUR = "#d62728"
_BOX_ORDER = {"node": 0, "host": 1, "pod": 2, "fabric": 3, "service": 4, "legend": 5}
_STYLE = """
.t{font-family:'DejaVu Sans',Helvetica,Arial,sans-serif;fill:#222}
.m{font-family:'DejaVu Sans Mono',Menlo,Consolas,monospace;fill:#222}
.sub{fill:#444}.vni{fill:#8a6d00}
.box{stroke:#666;stroke-width:1}.box-node{stroke:#444;stroke-width:1.6;fill:#fff}
.box-host{stroke:#999;stroke-dasharray:4 2}.box-fabric{stroke:#888}
.chip rect{fill:#fff;stroke:#555;stroke-width:1}.chip-tunnel rect{fill:#fff3bf;stroke:#b8860b}
.chip-listener rect{fill:#f6f6f6;stroke:#2b6cb0}.chip-port rect{fill:#f7f7f7}
.wire-veth{stroke:#9a9a9a;stroke-width:1.6}.wire-uplink{stroke:#777;stroke-width:3}
.wire-tunnel{stroke:#b8860b;stroke-width:1.6;stroke-dasharray:5 3}
.arrow{fill:none;stroke:#d62728;stroke-width:2.2;stroke-linejoin:round}
.arrow.encap{stroke-dasharray:7 3}
.badge rect{fill:#d62728;stroke:#fff;stroke-width:1}.badge text{fill:#fff;font-weight:bold}
.badge.dot rect{fill:#9a9a9a}
.hoprow{fill:#333}
"""


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _points(pts: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(pts))


def hop_line(h: Hop) -> str:
    """One line per hop for the table under a figure: place, where, addresses, what it carried."""
    if h.get("kind") == "proxy":
        p = h.get("proxy") or {}
        where = f"{p.get('listener', '')} {h.get('src', '')} -> {h.get('dst', '')} ==> {p.get('up_src', '')} -> " \
                f"{p.get('up_dst', '')} {p.get('proto', '')}"
    else:
        where = f"{h.get('iface_sym') or h.get('iface') or ''} {h.get('dir') or ''} {h.get('src', '')} -> {h.get('dst', '')}"
    extra = []
    enc = h.get("encap") or {}
    if enc:
        extra.append(f"geneve vni {enc.get('vni')}")
    if h.get("mark"):
        extra.append(f"mark {h['mark']}")
    if h.get("rules"):
        extra.append(", ".join(h["rules"]))
    return f"{h.get('at', '')}  {where}" + ("  · " + " · ".join(extra) if extra else "")


def to_svg(fig: Figure, *, table: bool = False, uid: str = "f") -> str:
    """The figure as one SVG document; ``uid`` keeps ids unique when two figures share a page."""
    rows = fig.hops if table else []
    height = fig.height + (len(rows) * 15 + 30 if rows else 0)
    marker = ('<marker id="{id}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="{size}" markerHeight="{size}" '
              'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{fill}"/></marker>')
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="netlab-figure" viewBox="0 0 {fig.width:.0f} {height:.0f}" '
            f'width="{fig.width:.0f}" height="{height:.0f}">')
    defs = ("<defs>" + marker.format(id=f"{uid}-ah", size=7, fill=TRACE_COLOUR)
            + marker.format(id=f"{uid}-ah-hl", size=6, fill="#1f5fbf") + "</defs>")
    out = [head, f"<style>{_STYLE}</style>", defs,
           f'<rect x="0" y="0" width="{fig.width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
           f'<text class="t" x="20" y="30" font-size="16" font-weight="bold">{_e(fig.title)}</text>']
    for b in sorted(fig.boxes, key=lambda b: _BOX_ORDER[b.kind]):
        r = b.rect
        rx = 10 if b.kind == "node" else 6 if b.kind in ("pod", "host") else 2
        tip = f"<title>{_e(b.tip)}</title>" if b.tip else ""
        out.append(f'<g class="box-g" data-ref="{_e(b.ref)}">{tip}<rect class="box box-{b.kind}" x="{r.x:.1f}" '
                   f'y="{r.y:.1f}" width="{r.w:.1f}" height="{r.h:.1f}" rx="{rx}" fill="{b.fill}"/></g>')
    for w in fig.wires:
        (x1, y1), (x2, y2) = w.points[0], w.points[-1]
        out.append(f'<line class="wire-{w.kind}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"/>')
    for lb in fig.labels:
        cls = ("m " if lb.mono else "t ") + lb.cls
        weight = ' font-weight="bold"' if lb.bold else ""
        out.append(f'<text class="{cls}" x="{lb.x:.1f}" y="{lb.y:.1f}" font-size="{lb.size:g}"{weight} '
                   f'text-anchor="{lb.anchor}">{_e(lb.text)}</text>')
    for c in fig.chips.values():
        r = c.rect
        out.append(f'<g class="chip chip-{c.kind}" data-key="{_e(c.key[0])}|{_e(c.key[1])}"><title>{_e(c.tip)}</title>'
                   f'<rect x="{r.x:.1f}" y="{r.y:.1f}" width="{r.w:.1f}" height="{r.h:.1f}" rx="3"/>'
                   f'<text class="m" x="{r.cx:.1f}" y="{r.y + 14:.1f}" font-size="11" text-anchor="middle">'
                   f"{_e(c.label)}</text></g>")
    by_n = {int(h.get("n") or 0): h for h in fig.hops}
    for a in fig.arrows:
        enc = " encap" if a.encap else ""
        out.append(f'<path class="arrow{enc}" data-hop="{a.n}" d="{_points(a.points)}" '
                   f'marker-end="url(#{uid}-ah)"><title>{_e(_tip(by_n.get(a.n, {})))}</title></path>')
    for bd in fig.badges:
        r = bd.rect
        h = by_n.get(bd.n, {})
        dot = "" if bd.text else " dot"
        seed = f' data-seed="{_e(h["seed_n"])}"' if h.get("seed_n") else ""
        text = (f'<text class="m" x="{r.cx:.1f}" y="{r.y + 13.5:.1f}" font-size="11.5" text-anchor="middle">'
                f"{_e(bd.text)}</text>") if bd.text else ""
        out.append(f'<g class="badge{dot}" data-hop="{bd.n}"{seed}><title>{_e(_tip(h))}</title>'
                   f'<rect x="{r.x:.1f}" y="{r.y:.1f}" width="{r.w:.1f}" height="{r.h:.1f}" rx="{r.h / 2:.1f}"/>'
                   f"{text}</g>")
    if rows:
        y = fig.height + 4
        out.append(f'<text class="t" x="20" y="{y:.0f}" font-size="12" font-weight="bold">hops (seed number, '
                   f"observed position, place, what)</text>")
        limit = int((fig.width - 40) / 6.1)
        for h in rows:
            y += 15
            line = f"{hop_text(h, False) or '·':>5} #{h.get('n', '?'):<3} {hop_line(h)}"
            line = line if len(line) <= limit else line[:limit - 1] + "…"
            out.append(f'<text class="m hoprow" data-hop="{_e(h.get("n", ""))}" x="20" y="{y:.0f}" '
                       f'font-size="10" xml:space="preserve">{_e(line)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _tip(h: Hop) -> str:
    if not h:
        return ""
    label = hop_text(h, True)
    return f"hop {h.get('n')}" + (f" = seed {label}" if h.get("seed_n") else "") + ": " + hop_line(h)


def figure_svg(plan: Any, hops: Sequence[Hop] = (), title: str | None = None, *, table: bool = False,
               uid: str = "f") -> str:
    """Plan (+ hops) -> SVG text: the one entry the CLI, the HTML page and the web UI share."""
    return to_svg(layout(plan, hops, title), table=table, uid=uid)


def render(svg_text: str, output: str) -> None:
    """Write ``output`` in the format its suffix names: .svg as it is, .png/.pdf via rsvg-convert."""
    fmt = Path(output).suffix.lstrip(".").lower() or "svg"
    if fmt == "svg":
        write_nofollow(output, svg_text)
        return
    if fmt not in ("png", "pdf"):
        raise UsageError(f"-o {output}: use a .svg, .png or .pdf file")
    exe = shutil.which("rsvg-convert")
    if exe is None:
        raise NetlabError("rsvg-convert is not installed (apt install librsvg2-bin); or write SVG with -o FILE.svg")
    r = subprocess.run([exe, "-f", fmt, "-o", output], input=svg_text.encode(), capture_output=True, timeout=120,
                       check=False)
    if r.returncode != 0:
        raise NetlabError(f"rsvg-convert failed: {r.stderr.decode(errors='replace').strip()[:500]}")


def write_nofollow(path: str, text: str) -> None:
    """Write a text file as root without following a symlink planted at ``path`` (say in /tmp)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def plan_for(target: str, datapath: str | None = None) -> tuple[Any, Any]:
    """(plan, lab or None): a running lab of that name, else a topology planned without root
    (``datapath``: instead of the topology's own; a running lab has the one it was made with)."""
    from netlab.lab import Lab

    try:
        running = target in Lab.running()
    except OSError:  # run dir not readable (not root): then it is a topology
        running = False
    if running:
        lab = Lab.attach(target)
        if datapath is not None and datapath != lab.plan.datapath:
            raise UsageError(f"lab {target!r} runs datapath {lab.plan.datapath}; --datapath {datapath} is for "
                             "topologies (bring it up with that datapath under another --name to draw it)")
        return lab.plan, lab
    from netlab.plan.build import build_plan
    from netlab.topology.load import load_topology, resolve

    path = resolve(target)
    topo = load_topology(path)
    return build_plan(topo, lab=topo.name, tunnel="userspace", source=str(path), datapath=datapath), None


def trace_title(plan: Any, d: dict[str, Any]) -> str:
    """``lab: trace A → B · 16 hops · contract S2 MATCH`` from a trace dict."""
    verdict = ("no contract" if d.get("contract") is None else
               f"contract {d['contract']} {'MATCH' if d.get('match') else 'MISMATCH'}")
    return f"{plan.lab}: trace {d.get('from')} → {d.get('to')} · {len(d.get('hops') or [])} hops · {verdict}"


def draw(target: str, output: str, trace: tuple[str, str] | None = None, datapath: str | None = None) -> str:
    """``netlab diagram`` as a function: draw TARGET (lab or topology), optionally tracing
    FROM TO first (a running lab only); returns the one-line summary."""
    plan, lab = plan_for(target, datapath)
    hops: list[Hop] = []
    title = None
    if trace:
        if lab is None:
            raise UsageError(f"--trace needs a running lab; {target!r} is not up (netlab up {target})")
        from netlab.verify.trace import trace as run_trace

        d = run_trace(lab, trace[0], trace[1], None).to_dict()
        hops = [h for h in d.get("hops", []) if isinstance(h, dict)]
        title = trace_title(plan, d)
    render(figure_svg(plan, hops, title, table=bool(trace)), output)
    drawn = sum(1 for h in hops if hop_key(h) is not None)
    extra = f", {len(hops)} hops ({drawn} drawn)" if trace else ""
    return f"wrote {output}: {len(plan.nodes)} nodes, {len(plan.pods)} pods, {len(plan.services)} services{extra}"


def run_cli(args: Any) -> int:
    """Entry of ``netlab diagram``."""
    print(draw(args.target, args.output, tuple(args.trace) if args.trace else None, getattr(args, "datapath", None)))
    return 0


def svg_texts(svg: str) -> list[str]:
    """Every text run of an SVG (what a reader sees); for tests and checks."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)
    return ["".join(t.itertext()) for t in root.iter() if t.tag.endswith("text")]


__all__ = [
    "MODE_COLOURS",
    "draw",
    "figure_svg",
    "hop_line",
    "plan_for",
    "render",
    "run_cli",
    "svg_texts",
    "to_svg",
    "trace_title",
    "write_nofollow",
]
