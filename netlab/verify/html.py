"""``netlab trace ... --html FILE``: one self-contained page with the drawing and the numbered hops.

Why a page and not only the terminal listing: each hop carries more than fits on a line (the
rules that matched with their reference positions, the ip rule and table, the Geneve outer
addresses, the proxy's two legs), and the reader wants it next to *where* the hop happened.
The page shows the figure of :mod:`netlab.verify.diagram` beside the hop list; hovering or
clicking a hop (in the list, on its number or on its arrow) highlights its arrow and shows its
details, and a step control walks the hops in order.

Self-contained on purpose: inline SVG, CSS and JS, a Content-Security-Policy that allows no
fetch at all, so the file can be mailed, attached to a bug or opened offline. Every piece of
lab data reaches the page as JSON inside a ``<script type="application/json">`` (``<`` escaped)
and is put into the DOM with ``textContent`` only: a hostile topology name cannot become markup.

:func:`compare_page` puts two traces side by side (two datapaths of the same path), each pane
with its own figure, list, details and step control; ``netlab ui`` reuses :data:`PAGE_CSS`,
:data:`PAGE_JS` and :func:`pane_html` for the trace it runs.
"""

from __future__ import annotations

import html
import json
from typing import Any

from netlab.verify.diagram import to_svg, trace_title, write_nofollow
from netlab.verify.layout import hop_key, hop_text, layout

PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

PAGE_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 'DejaVu Sans',Helvetica,Arial,sans-serif;color:#222;background:#fafafa}
.panes{display:grid;gap:12px;padding:12px}.panes.n2{grid-template-columns:1fr 1fr}
.pane{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 12px;min-width:0}
.pane h1{font-size:17px;margin:0 0 4px}.pane .meta{color:#555;font-size:12px}
.verdict{display:inline-block;font-weight:bold;padding:2px 8px;border-radius:4px;margin:4px 0}
.verdict.ok{background:#d9f2d9;color:#185c18}.verdict.bad{background:#fbdada;color:#8b1111}
.verdict.none{background:#eee;color:#444}
.diverged,.notes{font-size:12px;color:#8b1111;margin:2px 0}.notes{color:#555}
.pbody{display:flex;gap:12px;align-items:flex-start;margin-top:6px}
.n2 .pbody{flex-direction:column}
.fig{flex:1 1 auto;min-width:0;overflow:auto;border:1px solid #eee;border-radius:6px}
.fig svg{width:100%;height:auto;display:block}
aside{flex:0 0 470px;max-width:100%;position:sticky;top:8px}.n2 aside{flex-basis:auto;width:100%}
.stepper{display:flex;gap:6px;align-items:center;margin-bottom:6px}
.stepper button{font:inherit;padding:2px 10px;border:1px solid #aaa;border-radius:4px;background:#f4f4f4;cursor:pointer}
.stepper .pos{min-width:70px;text-align:center;font-family:'DejaVu Sans Mono',monospace}
ol.hops{list-style:none;margin:0;padding:0;max-height:46vh;overflow:auto;border:1px solid #eee;border-radius:6px}
li.hop{display:flex;gap:8px;padding:3px 6px;border-bottom:1px solid #f0f0f0;cursor:pointer;font-size:12.5px}
li.hop:hover{background:#f3f7ff}li.hop.sel{background:#dde8ff}
li.hop .seed{flex:0 0 40px;font-weight:bold;color:#d62728;font-family:'DejaVu Sans Mono',monospace}
li.hop .obs{flex:0 0 30px;color:#999;font-family:'DejaVu Sans Mono',monospace}
li.hop .at{flex:0 0 150px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
li.hop .where{flex:1 1 auto;font-family:'DejaVu Sans Mono',monospace;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
li.hop.unmatched .seed{color:#999}
.details{margin-top:8px;border:1px solid #e4e4e4;border-radius:6px;padding:6px 8px;font-size:12.5px;min-height:60px}
.details h2{font-size:14px;margin:0 0 4px}.details .hint{color:#888}
.details dl{display:grid;grid-template-columns:120px 1fr;gap:2px 8px;margin:0}
.details dt{color:#666}.details dd{margin:0;font-family:'DejaVu Sans Mono',monospace;word-break:break-word}
.details ul{margin:0;padding-left:16px}
.pane.stack .pbody{flex-direction:column}
.pane.stack aside{position:static;width:100%;flex-basis:auto;display:grid;grid-template-columns:minmax(0,1.3fr) minmax(0,1fr);
  gap:0 10px;align-items:start}
.pane.stack .stepper{grid-column:1/-1}.pane.stack .details{margin-top:0}.pane.stack .fig{width:100%}
.netlab-figure .badge,.netlab-figure .arrow{cursor:pointer}
.netlab-figure.dim .arrow:not(.hl){opacity:.22}.netlab-figure.dim .badge:not(.hl){opacity:.45}
.netlab-figure .arrow.hl{stroke:#1f5fbf;stroke-width:4}
.netlab-figure .badge.hl rect{fill:#1f5fbf}
.netlab-figure .chip.hl rect{stroke:#1f5fbf;stroke-width:3}
"""

PAGE_JS = r"""
(function(){
"use strict";
function el(tag, cls, text){const e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=text;return e;}
function ep(h){if(!h)return "";return h;}
function rows(h){
  const r=[];
  r.push(["place",h.at]);r.push(["namespace",h.netns]);
  if(h.kind==="proxy"){
    const p=h.proxy||{};
    r.push(["proxy leg",(p.component||"")+" "+(p.listener||"")]);
    r.push(["downstream",(h.src||"")+" → "+(h.dst||"")+" (original destination)"]);
    r.push(["upstream",(p.proto||"tcp")+" "+ep(p.up_src)+" → "+ep(p.up_dst)]);
    if(p.authority)r.push([":authority",p.authority]);
    if(p.src_id||p.dst_id)r.push(["identities",(p.src_id||"-")+" → "+(p.dst_id||"-")]);
    r.push(["outcome",p.outcome||""]);
  }else{
    r.push(["interface",(h.iface||"")+(h.iface_sym&&h.iface_sym!==h.iface?"  = "+h.iface_sym:"")]);
    r.push(["direction",h.dir==="in"?"in (received here)":h.dir==="out"?"out (sent from here)":(h.dir||"")]);
    r.push(["5-tuple",(h.proto==="hbone"?"tcp (HBONE)":(h.proto||"tcp"))+"  "+(h.src||"")+" → "+(h.dst||"")]);
    const e=h.encap;
    r.push(["encapsulation",e?("Geneve VNI "+e.vni+", outer "+(e.outer_src||"?")+" → "+(e.outer_dst||"?")):"none"]);
    r.push(["mark",h.mark||"none"]);
    r.push(["iptables",(h.rules&&h.rules.length)?h.rules:["none matched"]]);
    r.push(["ip rule / table",h.route||"—"]);
  }
  if(h.what)r.push(["what",h.what]);
  return r;
}
function init(root, data){
  const hops=data.hops||[], uid=data.uid, svg=root.querySelector("svg.netlab-figure");
  const items=[...root.querySelectorAll("li.hop")], details=root.querySelector(".details");
  const pos=root.querySelector(".stepper .pos");
  let cur=-1, timer=null;
  function mark(i){
    items.forEach((li,k)=>li.classList.toggle("sel",k===i));
    if(svg){
      svg.classList.toggle("dim",i>=0);
      svg.querySelectorAll(".hl").forEach(x=>{x.classList.remove("hl");if(x.tagName==="path")x.setAttribute("marker-end","url(#"+uid+"-ah)");});
      if(i>=0){
        const n=String(hops[i].n);
        svg.querySelectorAll('[data-hop="'+n+'"]').forEach(x=>{x.classList.add("hl");if(x.tagName==="path")x.setAttribute("marker-end","url(#"+uid+"-ah-hl)");});
        const key=(data.anchors||{})[n];
        if(key)svg.querySelectorAll(".chip").forEach(c=>{if(c.getAttribute("data-key")===key)c.classList.add("hl");});
      }
    }
    show(i);
  }
  function show(i){
    details.textContent="";
    if(i<0){details.appendChild(el("p","hint","Hover or click a hop (in the list, its number or its arrow)."));return;}
    const h=hops[i];
    details.appendChild(el("h2",null,(h.seed_n?"("+h.seed_n+") ":"· ")+"hop "+h.n+" of "+hops.length+(h.seed_n?" — the seed's ("+h.seed_n+")":"")));
    const dl=el("dl");
    for(const [k,v] of rows(h)){
      dl.appendChild(el("dt",null,k));
      const dd=el("dd");
      if(Array.isArray(v)){const ul=el("ul");v.forEach(x=>ul.appendChild(el("li",null,x)));dd.appendChild(ul);}else dd.textContent=v;
      dl.appendChild(dd);
    }
    details.appendChild(dl);
  }
  function select(i){cur=Math.max(-1,Math.min(hops.length-1,i));if(pos)pos.textContent=(cur+1)+" / "+hops.length;mark(cur);
    if(cur>=0&&items[cur])items[cur].scrollIntoView({block:"nearest"});}
  function byHop(n){return hops.findIndex(h=>String(h.n)===String(n));}
  items.forEach((li,i)=>{li.addEventListener("mouseenter",()=>mark(i));li.addEventListener("mouseleave",()=>mark(cur));
    li.addEventListener("click",()=>select(i));li.addEventListener("keydown",ev=>{if(ev.key==="Enter")select(i);});});
  if(svg)svg.querySelectorAll(".badge,.arrow").forEach(x=>{const i=byHop(x.getAttribute("data-hop"));
    x.addEventListener("mouseenter",()=>mark(i));x.addEventListener("mouseleave",()=>mark(cur));
    x.addEventListener("click",()=>select(i));});
  const b=(c)=>root.querySelector(".stepper ."+c);
  function stop(){if(timer){clearInterval(timer);timer=null;b("play").textContent="play";}}
  b("first").addEventListener("click",()=>{stop();select(0);});
  b("prev").addEventListener("click",()=>{stop();select(cur<=0?0:cur-1);});
  b("next").addEventListener("click",()=>{stop();select(cur+1);});
  b("play").addEventListener("click",()=>{if(timer){stop();return;}b("play").textContent="pause";
    if(cur>=hops.length-1)select(-1);timer=setInterval(()=>{if(cur>=hops.length-1){stop();return;}select(cur+1);},900);});
  root.addEventListener("keydown",ev=>{if(ev.key==="ArrowRight"||ev.key==="ArrowDown"){select(cur+1);ev.preventDefault();}
    else if(ev.key==="ArrowLeft"||ev.key==="ArrowUp"){select(Math.max(0,cur-1));ev.preventDefault();}});
  select(-1);
  return {select:select,count:hops.length};
}
window.netlabPanes={init:init};
document.addEventListener("DOMContentLoaded",()=>{
  const src=document.getElementById("netlab-traces");
  if(!src)return;
  const all=JSON.parse(src.textContent);
  document.querySelectorAll("section.pane").forEach((root,k)=>{root.netlab=init(root,all[k]);});
});
})();
"""


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def script_json(obj: Any) -> str:
    """JSON safe inside ``<script>``: no ``<``, ``>`` or ``&`` that could end the element."""
    return (json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def verdict(trace: dict[str, Any]) -> tuple[str, str]:
    """(css class, text): the contract verdict as ``netlab trace`` prints it."""
    if trace.get("contract") is None:
        return "none", "contract: none for this from/to; hops not checked"
    n = sum(1 for h in trace.get("hops") or [] if h.get("seed_n"))
    if trace.get("match"):
        return "ok", f"contract {trace['contract']}: MATCH ({n} contract hops seen)"
    return "bad", f"contract {trace['contract']}: MISMATCH"


def _where(h: dict[str, Any]) -> str:
    if h.get("kind") == "proxy":
        p = h.get("proxy") or {}
        return f"{p.get('listener', '')}  {h.get('src', '')} → {p.get('up_dst', '')}"
    enc = " geneve" if h.get("encap") else ""
    return f"{h.get('iface_sym') or h.get('iface') or ''} {h.get('dir') or ''}  {h.get('src', '')} → {h.get('dst', '')}{enc}"


def pane_data(plan: Any, trace: dict[str, Any], uid: str) -> dict[str, Any]:
    """What the page's script needs for one pane: the hops and which chip each is drawn at."""
    hops = [h for h in trace.get("hops") or [] if isinstance(h, dict)]
    anchors = {}
    for h in hops:
        k = hop_key(h)
        if k is not None:
            anchors[str(h.get("n"))] = f"{k[0]}|{k[1]}"
    return {"uid": uid, "hops": hops, "anchors": anchors}


STACK_WIDTH = 1400  # a figure wider than this goes above the list instead of beside it


def pane_html(plan: Any, trace: dict[str, Any], *, uid: str, label: str | None = None, stack: bool | None = None) -> str:
    """One pane: heading with the verdict, the figure, the step control, the hop list, details.
    The figure sits beside the list; a wide one (``stack``; by default wider than STACK_WIDTH,
    e.g. four nodes) goes above it, with the list and the details side by side underneath."""
    hops = [h for h in trace.get("hops") or [] if isinstance(h, dict)]
    cls, text = verdict(trace)
    title = trace_title(plan, trace)
    fig = layout(plan, hops, title)
    svg = to_svg(fig, uid=uid)
    if stack is None:
        stack = fig.width > STACK_WIDTH
    meta = (f"HTTP {trace.get('status') or '-'} · {trace.get('elapsed_ms', '?')} ms · lab {trace.get('lab', plan.lab)} "
            f"· topology {plan.topology} · " + ("datapath inpod" if plan.datapath == "inpod" else f"tunnel {plan.tunnel}")
            + f" · trace {trace.get('trace_id', '')}")
    out = [f'<section class="pane{" stack" if stack else ""}" tabindex="0" data-uid="{_e(uid)}">',
           (f"<h1>{_e((label + ': ') if label else '')}{_e(trace.get('from'))} → {_e(trace.get('to'))}"
            f"{_e(trace.get('url') or '')}</h1>"),
           f'<div class="verdict {cls}">{_e(text)}</div> <span class="meta">{_e(meta)}</span>']
    div = trace.get("diverged")
    if div:
        out.append(f'<div class="diverged">{_e(div.get("reason", ""))}: expected {_e(json.dumps(div.get("expected")))}</div>')
    if trace.get("error"):
        out.append(f'<div class="diverged">error: {_e(trace["error"])}</div>')
    for note in trace.get("notes") or []:
        out.append(f'<div class="notes">note: {_e(note)}</div>')
    out.append(f'<div class="pbody"><div class="fig">{svg}</div><aside>')
    out.append('<div class="stepper"><button class="first" title="first hop">first</button>'
               '<button class="prev" title="previous hop (←)">◀</button><span class="pos">0 / 0</span>'
               '<button class="next" title="next hop (→)">▶</button><button class="play">play</button></div>')
    out.append('<ol class="hops">')
    for h in hops:
        seed = hop_text(h, False)
        un = "" if seed else " unmatched"
        out.append(f'<li class="hop{un}" tabindex="0" data-hop="{_e(h.get("n"))}"><span class="seed">{_e(seed or "·")}</span>'
                   f'<span class="obs">#{_e(h.get("n"))}</span><span class="at">{_e(h.get("at", ""))}</span>'
                   f'<span class="where">{_e(_where(h))}</span></li>')
    out.append('</ol><div class="details"></div></aside></div></section>')
    return "\n".join(out)


def _page(title: str, panes: list[str], data: list[dict[str, Any]]) -> str:
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{PAGE_CSS}</style></head><body>",
        f'<div class="panes n{len(panes)}">', *panes, "</div>",
        f'<script type="application/json" id="netlab-traces">{script_json(data)}</script>',
        f"<script>{PAGE_JS}</script>", "</body></html>", ""])


def trace_page(plan: Any, trace: dict[str, Any]) -> str:
    """The whole self-contained page for one trace."""
    return _page(f"netlab trace {trace.get('from')} → {trace.get('to')}", [pane_html(plan, trace, uid="p0")],
                 [pane_data(plan, trace, "p0")])


def compare_page(left: tuple[Any, dict[str, Any], str], right: tuple[Any, dict[str, Any], str]) -> str:
    """Two traces side by side, e.g. the same path on two datapaths: (plan, trace dict, label) each."""
    panes, data = [], []
    for i, (plan, trace, label) in enumerate((left, right)):
        panes.append(pane_html(plan, trace, uid=f"p{i}", label=label))
        data.append(pane_data(plan, trace, f"p{i}"))
    return _page(f"netlab compare: {left[2]} | {right[2]}", panes, data)


def write_trace_html(path: str, plan: Any, trace: dict[str, Any]) -> None:
    write_nofollow(path, trace_page(plan, trace))


__all__ = [
    "PAGE_CSP",
    "PAGE_CSS",
    "PAGE_JS",
    "compare_page",
    "pane_data",
    "pane_html",
    "script_json",
    "trace_page",
    "verdict",
    "write_trace_html",
]
