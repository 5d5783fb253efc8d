"""The single page of ``netlab ui``: lab list, the chosen lab's figure and processes, a trace form,
and the trace shown as the ``--html`` page shows it (the same CSS, script and pane markup from
:mod:`netlab.verify.html`).

Lab data enters the DOM through ``textContent`` or as markup the server built with every value
escaped (the figure, the trace pane); the page's scripts run only with the response's nonce.
"""

from __future__ import annotations

import html

from netlab.verify.html import PAGE_CSS, PAGE_JS

UI_CSS = """
header.top{display:flex;align-items:center;gap:16px;padding:8px 14px;background:#233;color:#fff}
header.top h1{font-size:18px;margin:0}header.top .who{font-size:12px;color:#cde}
main{display:grid;grid-template-columns:250px 1fr;gap:12px;padding:12px}
nav.labs{background:#fff;border:1px solid #ddd;border-radius:8px;padding:8px}
nav.labs h2,section.card h2{font-size:15px;margin:0 0 6px}
nav.labs button.lab{display:block;width:100%;text-align:left;margin:4px 0;padding:6px 8px;border:1px solid #ccc;
  border-radius:6px;background:#f8f8f8;cursor:pointer;font:inherit}
nav.labs button.lab.sel{background:#dde8ff;border-color:#7a9be0}
nav.labs .health,.healthbadge{font-size:11px;padding:1px 6px;border-radius:3px;margin-left:4px}
.h-up{background:#d9f2d9;color:#185c18}.h-degraded,.h-broken{background:#fbdada;color:#8b1111}
.h-starting{background:#fff0c2;color:#6b5200}
section.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 12px;margin-bottom:12px;min-width:0}
#base-fig svg{width:100%;height:auto}
table.procs{border-collapse:collapse;font-size:12.5px}table.procs td,table.procs th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
.st-running{color:#185c18}.st-dead{color:#8b1111;font-weight:bold}.st-restarting{color:#6b5200}
form.trace{display:flex;gap:8px;align-items:center;flex-wrap:wrap}
form.trace select,form.trace button{font:inherit;padding:3px 6px}
#msg{color:#8b1111;font-size:13px;min-height:1em}#busy{color:#555;font-size:13px}
#result .panes{padding:0}
.hidden{display:none}
"""

UI_JS = r"""
(function(){
"use strict";
const TOKEN=document.querySelector('meta[name="netlab-token"]').content;
const $=(s)=>document.querySelector(s);
function el(tag,cls,text){const e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=text;return e;}
async function api(path,opts){opts=opts||{};opts.headers=Object.assign({"X-Netlab-Token":TOKEN},opts.headers||{});
  opts.credentials="same-origin";const r=await fetch(path,opts);let body={};try{body=await r.json();}catch(e){body={error:r.statusText};}
  if(!r.ok)throw new Error(body.error||("HTTP "+r.status));return body;}
let current=null;
async function loadLabs(){
  const nav=$("#lab-list");nav.textContent="";
  try{const r=await api("/api/labs");
    if(!r.labs.length)nav.appendChild(el("p","hint","No lab is up. Start one: sudo netlab up TOPOLOGY"));
    for(const l of r.labs){const b=el("button","lab");b.dataset.lab=l.name;b.appendChild(el("b",null,l.name));
      b.appendChild(el("span","health h-"+l.health,l.health));b.appendChild(el("div","sub",(l.topology||"")+(l.tunnel?" · "+l.tunnel:"")));
      b.addEventListener("click",()=>openLab(l.name));nav.appendChild(b);}
  }catch(e){nav.appendChild(el("p","msg",e.message));}
}
function fillSelect(sel,values){sel.textContent="";for(const v of values){const o=el("option",null,v);o.value=v;sel.appendChild(o);}}
async function openLab(name){
  $("#msg").textContent="";
  document.querySelectorAll("button.lab").forEach(b=>b.classList.toggle("sel",b.dataset.lab===name));
  let v;try{v=await api("/api/labs/"+encodeURIComponent(name));}catch(e){$("#msg").textContent=e.message;return;}
  current=name;const st=v.status;
  $("#lab-view").classList.remove("hidden");
  $("#lab-name").textContent=st.lab+" (topology "+st.topology+", tunnel "+st.tunnel+")";
  const hb=$("#lab-health");hb.textContent=st.health;hb.className="healthbadge h-"+st.health;
  const pr=$("#problems");pr.textContent="";(st.problems||[]).forEach(p=>pr.appendChild(el("li",null,p)));
  $("#base-fig").innerHTML=v.svg;
  const tb=$("#procs tbody");tb.textContent="";
  for(const p of st.processes||[]){const tr=el("tr");
    [p.name,p.kind,p.state,p.pid===null||p.pid===undefined?"-":String(p.pid),String(p.restarts||0),
     p.last_exit===null||p.last_exit===undefined?"":String(p.last_exit)].forEach((t,i)=>{const td=el("td",i===2?"st-"+p.state:null,t);tr.appendChild(td);});
    tb.appendChild(tr);}
  fillSelect($("#src"),v.sources);fillSelect($("#dst"),v.destinations);
  if(v.paths&&v.paths.length){$("#src").value=v.paths[0].from;$("#dst").value=v.paths[0].to;}
  $("#result").textContent="";$("#capture").classList.add("hidden");$("#base-card").classList.remove("hidden");
}
async function runTrace(ev){
  ev.preventDefault();if(!current)return;
  $("#msg").textContent="";$("#busy").textContent="tracing "+$("#src").value+" → "+$("#dst").value+" …";$("#run").disabled=true;
  try{const r=await api("/api/labs/"+encodeURIComponent(current)+"/trace",{method:"POST",
      headers:{"Content-Type":"application/json"},body:JSON.stringify({from:$("#src").value,to:$("#dst").value})});
    $("#base-card").classList.add("hidden");  // the trace's figure is the same drawing, with the hops
    const box=$("#result");box.innerHTML='<div class="panes n1">'+r.pane+"</div>";
    const pane=box.querySelector("section.pane");pane.netlab=window.netlabPanes.init(pane,r.data);
    const a=$("#capture");a.href="/api/labs/"+encodeURIComponent(current)+"/capture.pcapng";
    a.textContent="download the capture of this trace (pcapng, "+r.capture_frames+" frames)";a.classList.remove("hidden");
    $("#busy").textContent="";
  }catch(e){$("#busy").textContent="";$("#msg").textContent=e.message;}
  finally{$("#run").disabled=false;}
}
document.addEventListener("DOMContentLoaded",()=>{$("#trace-form").addEventListener("submit",runTrace);
  $("#refresh").addEventListener("click",()=>{loadLabs();if(current)openLab(current);});loadLabs();});
})();
"""


def page(token: str, nonce: str) -> str:
    """The whole page; ``token`` goes into a meta tag for the page's own requests."""
    t, n = html.escape(token, quote=True), html.escape(nonce, quote=True)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="netlab-token" content="{t}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>netlab ui</title>
<style>{PAGE_CSS}{UI_CSS}</style></head><body>
<header class="top"><h1>netlab ui</h1><span class="who">Istio's datapath in network namespaces: labs, figures, traces</span>
<button id="refresh" type="button">refresh</button></header>
<main><nav class="labs"><h2>running labs</h2><div id="lab-list"></div></nav>
<div id="content"><p id="msg"></p>
<div id="lab-view" class="hidden">
<section class="card"><h2><span id="lab-name"></span> <span id="lab-health" class="healthbadge"></span></h2>
<ul id="problems"></ul><div id="base-card"><div id="base-fig"></div></div></section>
<section class="card"><h2>trace a request</h2>
<form id="trace-form" class="trace"><label>from <select id="src" name="from"></select></label>
<label>to <select id="dst" name="to"></select></label><button id="run" type="submit">run trace</button>
<span id="busy"></span></form><p><a id="capture" class="hidden" download></a></p><div id="result"></div></section>
<section class="card"><h2>processes</h2><table id="procs" class="procs"><thead><tr><th>process</th><th>kind</th>
<th>state</th><th>pid</th><th>restarts</th><th>last exit</th></tr></thead><tbody></tbody></table></section>
</div></div></main>
<script nonce="{n}">{PAGE_JS}</script><script nonce="{n}">{UI_JS}</script>
</body></html>
"""


__all__ = ["page"]
