"""``netlab trace --probe POD``: one kubelet probe, sent as the node's kubelet stand-in sends it,
followed hop by hop and checked against the probe's contract for the lab's release.

The probe leaves the node's own stack (the kubelet is a host process), from ``HOST_IP`` (the
address of the pod's veth on the node, which a route lookup to the pod picks), to the pod's IP
and the probe's port. It is followed with :mod:`netlab.verify.trace`'s machinery (the SYN seen in
every namespace it crosses, the proxies' legs, the rules replayed per hop); the leg is joined by
the source the pod sees, which under the in-pod datapath is the node's SNAT address
169.254.7.127 for an enrolled pod.

The contract (:func:`probe_contract`), per release and the pod's mode:

* 1.18 (reference §8 D): the probe goes straight out of the pod's veth, by the main table
  (``ztunnel-OUTPUT`` marks host traffic 0x220, which rule 100 sends to main, ahead of table 100's
  route into ``istioin``), and into the pod's eth0;
* inpod (inpod reference §5 P): out of the pod's veth, into its eth0 where, for an enrolled pod,
  ``nat ISTIO_PRERT #1`` ACCEPTs the SNATed probe before #2 would redirect it to ztunnel;
* a sidecar pod: then its 15006 and, from 127.0.0.6, the app (no probe rewrite: docs/deviations.md).
"""

from __future__ import annotations

import json
import random
import socket
import time
import uuid
from typing import Any

from netlab import istio
from netlab.errors import NetlabError, UsageError
from netlab.netns import in_netns
from netlab.plan.types import Plan, PodInfo
from netlab.topology.model import Hop, RequestPath
from netlab.verify.hops import Geography, parse_frame
from netlab.verify.labview import LabView
from netlab.verify.sniff import Capture
from netlab.verify.trace import LEG_WAIT, Followed, LegLog, TraceResult, _follow, _judge, http_get, observe


def probe_of(plan: Plan, pod: PodInfo, kind: str) -> dict[str, Any]:
    """The ``kind`` probe of ``pod`` as its node's kubelet has it (from the kubelet's argv)."""
    for pr in plan.processes:
        if pr.kind == "kubelet" and pr.ref == pod.node:
            probes = json.loads(pr.argv[pr.argv.index("--probes") + 1])
            for p in probes:
                if p["pod"] == pod.ref and p["kind"] == kind:
                    return dict(p)
    raise UsageError(f"--probe {pod.ref}: the pod declares no {kind} probe (topology: probes: {{{kind}: {{port, path}}}})")


def probe_contract(plan: Plan, pod: PodInfo, port: int) -> RequestPath:
    """The hops a probe to ``pod`` must take in this lab's release (module docstring)."""
    node = f"node:{pod.node}"
    me = f"pod:{pod.ref}"
    inpod = plan.datapath == istio.DATAPATH_INPOD
    hops = [Hop(n="1", at=node, iface=f"veth({pod.ref})", dir="out", port=port,
                what="the kubelet's probe leaves the node straight to the pod"
                     + ("" if inpod or pod.mode != "ambient" else " (0x220: ztunnel-OUTPUT #1, then main)"))]
    if inpod and pod.mode == "ambient":
        hops.append(Hop(n="2", at=me, iface="eth0", dir="in", port=port, rules=["§1.4 nat ISTIO_PRERT #1"],
                        what="the SNATed probe (169.254.7.127) is ACCEPTed before ztunnel's REDIRECT"))
    else:
        hops.append(Hop(n="2", at=me, iface="eth0", dir="in", port=port, what="into the pod"))
    if pod.mode == "sidecar":
        hops += [Hop(n="3", at=me, listener=f"sidecar:{istio.SIDECAR_INBOUND_PORT}", what="the sidecar's inbound"),
                 Hop(n="4", at=me, iface="lo", dir="out", port=port, what="to the app from 127.0.0.6")]
    return RequestPath.model_validate({"name": f"probe ({plan.datapath}, {pod.mode} pod)", "from": f"kubelet:{pod.node}",
                                       "to": f"{pod.ip}:{port}", "hops": [h.model_dump() for h in hops]})


def _open_on_node(netns: str, ip: str) -> tuple[socket.socket, int]:
    with in_netns(netns):
        for _ in range(50):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            port = random.randint(20000, 30999)
            try:
                s.bind((ip, port))
                return s, port
            except OSError:
                s.close()
    raise NetlabError(f"no free source port in {netns}")


def trace_probe(lab: LabView, pod_ref: str, kind: str = "readiness", *, timeout: float = 5.0) -> TraceResult:
    """Send the ``kind`` probe of ``pod_ref`` once from its node and reconstruct its hops."""
    t0 = time.monotonic()
    plan = lab.plan
    pod = lab.pod(pod_ref)
    probe = probe_of(plan, pod, kind)
    node = plan.node(pod.node)
    port, path = int(probe["port"]), str(probe["path"])
    contract = probe_contract(plan, pod, port)
    status, body, err, first, sport = 0, "", "", "", 0

    def send(geo: Geography, cap: Capture, legs: LegLog) -> Followed:
        nonlocal status, body, err, first, sport
        sock, sport = _open_on_node(node.netns, node.host_ip)
        status, body, err = http_get(sock, pod.ip, port, pod.ip, path, uuid.uuid4().hex[:12], timeout)
        first = _first_source(cap, sport, node.host_ip)
        return _follow(geo, cap, legs, first, deadline=time.monotonic() + LEG_WAIT)

    hops, notes, _ = observe(lab, send, pod.ip, port, "netlab-probe-trace")
    if first != f"{node.host_ip}:{sport}":
        notes.append(f"the pod saw the probe from {first} (SNAT on {pod.node}), not from HOST_IP {node.host_ip}")
    res = TraceResult(lab.name, f"probe-{kind}", f"kubelet:{pod.node}", f"{pod.ref} {pod.ip}:{port}", path, status, body,
                      (time.monotonic() - t0) * 1000, hops, contract=contract, error=err, notes=notes)
    _judge(res)
    return res


def _first_source(cap: Capture, sport: int, host_ip: str, wait: float = 0.5) -> str:
    """The probe's source as the first SYN with our port shows it (after any SNAT: the node's
    first sighting is on the way out), else HOST_IP's; the capture may lag the request a little."""
    deadline = time.monotonic() + wait
    while True:
        for c in cap.since(0):
            seg = parse_frame(c.raw)
            if seg is not None and seg.is_syn and seg.sport == sport and seg.encap is None:
                return f"{seg.src}:{seg.sport}"
        if time.monotonic() > deadline:
            return f"{host_ip}:{sport}"
        time.sleep(0.01)
