"""A waypoint added to or removed from a running lab, as a plan delta (`netlab waypoint add|rm`).

``istioctl waypoint apply -n NS`` in a cluster makes a Gateway, and the mesh controller a
Deployment: one more pod with its own proxy; ztunnel sends the namespace's traffic through it
from its next lookup (1.18: the waypoint of a workload's namespace, reference §7; inpod: the
namespace's Services are bound with ``istio.io/use-waypoint``, what ``--enroll-namespace`` does,
plan/build.py's ``_use_waypoint``). No other pod restarts or moves.

So here, too: the lab with the waypoint is the plan of its topology with one more ``waypoints:``
entry, built by the same builders as `up` (:func:`netlab.plan.build.build_plan`); waypoints take
their addresses from the top of the node's pod CIDR (build.py), so the entry at the end of the
list moves no other pod. The delta is that pod's objects (netns, veth, addresses, routes, what
is in its netns) and its process; any other difference is refused. Pure: no root, no kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from netlab import istio, names
from netlab.errors import UsageError
from netlab.plan.types import Link, Netns, Plan, PodInfo, Process
from netlab.topology.model import Topology, Waypoint

#: what one change is, as kept in the lab's state directory (waypoints.json), in order
WaypointOp = dict[str, str]  # {"op": "add"|"rm", "namespace", "name", "node" (add)}

WAYPOINT_HELP = """\
Add a waypoint to a namespace of a running lab, or remove it, as `istioctl waypoint apply -n NS
--enroll-namespace` and `istioctl waypoint delete -n NS` do; no other pod restarts or moves:

  netlab waypoint add bar                 one waypoint pod (bar/waypoint) with its own proxy
  netlab waypoint add bar --node node2    on node2 (default: the node of bar's first pod)
  netlab waypoint rm bar                  remove it; bar's traffic goes direct again

istio-1.18 (reference §7): ztunnel sends traffic to every workload of the namespace through the
namespace's waypoint (HBONE to its 15008), from its next connection. inpod: the namespace's
Services are bound to it (istio.io/use-waypoint, unless a Service or the namespace names
another), and VIP traffic of ztunnel clients goes through it.

The waypoint's pod takes the highest free address of its node's pod CIDR; it is in the ledger
before it is made, so `netlab down` removes it like the rest. `netlab status` lists it (mode
waypoint). Exit 2, nothing changed: unknown lab or namespace, a namespace that is not ambient,
that has a waypoint of that name already (add) or none (rm).
"""


@dataclass(frozen=True)
class WaypointChange:
    op: Literal["add", "rm"]
    namespace: str
    name: str = "waypoint"
    node: str | None = None  # add: None = the node of the namespace's first pod (else the first node)

    def describe(self) -> str:
        return f"waypoint {self.op} {self.namespace}/{self.name}" + (f" on {self.node}" if self.node else "")


def check_change(topo: Topology, ch: WaypointChange) -> WaypointOp:
    """``ch`` checked against the topology as it stands (with the changes so far), as one op
    to record; UsageError (one line) when it cannot be made."""
    try:
        names.check_label(ch.namespace, "namespace")
        names.check_label(ch.name, "waypoint name")
        if ch.node is not None:
            names.check_label(ch.node, "node")
    except names.BadName as e:
        raise UsageError(str(e)) from None
    ns = topo.namespaces.get(ch.namespace)
    if ns is None:
        raise UsageError(f"no namespace {ch.namespace!r} in the lab (namespaces: {', '.join(sorted(topo.namespaces))})")
    have = [w for w in topo.waypoints if w.namespace == ch.namespace]
    if ch.op == "rm":
        if not any(w.name == ch.name for w in have):
            raise UsageError(f"namespace {ch.namespace} has no waypoint {ch.name!r} "
                             f"(it has: {', '.join(w.name for w in have) or 'none'})")
        return {"op": "rm", "namespace": ch.namespace, "name": ch.name}
    if have:
        raise UsageError(f"namespace {ch.namespace} has a waypoint already ({', '.join(w.name for w in have)}); "
                         f"`netlab waypoint rm {ch.namespace}` first")
    if ns.labels.get(istio.LABEL_DATAPLANE_MODE) != istio.DATAPLANE_MODE_AMBIENT:
        raise UsageError(f"namespace {ch.namespace} is not ambient (label {istio.LABEL_DATAPLANE_MODE}: ambient); "
                         "a waypoint serves ambient workloads")
    if any(p.namespace == ch.namespace and p.name == ch.name for p in topo.pods):
        raise UsageError(f"namespace {ch.namespace} has a pod named {ch.name!r}; use --name")
    node = ch.node
    if node is None:
        node = next((p.node for p in topo.pods if p.namespace == ch.namespace), topo.nodes[0].name)
    elif node not in {n.name for n in topo.nodes}:
        raise UsageError(f"no node {node!r} in the lab (nodes: {', '.join(n.name for n in topo.nodes)})")
    return {"op": "add", "namespace": ch.namespace, "name": ch.name, "node": node}


def with_waypoints(topo: Topology, ops: Sequence[WaypointOp]) -> Topology:
    """``topo`` with the waypoint changes ``ops`` made, in order: an added one at the end of
    ``waypoints:``, a removed one taken out of it."""
    wps = [w.model_copy() for w in topo.waypoints]
    for op in ops:
        key = (op["namespace"], op["name"])
        if op["op"] == "add":
            wps.append(Waypoint(namespace=op["namespace"], name=op["name"], node=op["node"]))
        else:
            wps = [w for w in wps if (w.namespace, w.name) != key]
    return topo.model_copy(update={"waypoints": wps})


@dataclass
class PodDelta:
    """One pod made or removed: its netns, the veth into it, the objects in its netns and on the
    node's end of its veth (in plan order), its processes; the registry change is the rest."""

    pod: PodInfo
    netns: Netns
    link: Link
    objs: list[Any] = field(default_factory=list)  # addresses, routes, sysctls, ... in the pod's and node's netns
    processes: list[Process] = field(default_factory=list)
    services: dict[str, tuple[str, str]] = field(default_factory=dict)  # inpod: Service ref -> (old, new) waypoint

    def to_dict(self) -> dict[str, Any]:
        return {"pod": self.pod.ref, "node": self.pod.node, "ip": self.pod.ip, "netns": self.netns.name,
                "processes": [p.name for p in self.processes],
                "objects": [o.describe() for o in (self.netns, self.link, *self.objs)],
                "services": {k: {"from": a or None, "to": b or None} for k, (a, b) in self.services.items()}}


def pod_delta(old: Plan, new: Plan, ref: str) -> PodDelta:
    """What ``new`` has that ``old`` has not (or the reverse, when pod ``ref`` is in ``old`` only),
    all of it pod ``ref``'s; UsageError if anything else differs (another pod would move)."""
    adding = any(p.ref == ref for p in new.pods)
    big, small = (new, old) if adding else (old, new)
    pod = big.pod(ref)
    others_big = [p for p in big.pods if p.ref != ref]
    if others_big != list(small.pods):
        moved = next((f"{a.ref} {a.ip} -> {b.ip}" for a, b in zip(others_big, small.pods, strict=False) if a != b), "")
        raise UsageError(f"{'adding' if adding else 'removing'} waypoint {ref} would change another pod ({moved}); "
                         "remove the waypoints added after it first")
    node_netns = big.nodes[[n.name for n in big.nodes].index(pod.node)].netns

    def mine(o: Any) -> bool:
        if getattr(o, "netns", None) == pod.netns:
            return True
        return o.netns == node_netns and (getattr(o, "dev", None) == pod.host_veth or getattr(o, "name", None) == pod.host_veth)

    objs: list[Any] = []
    procs: list[Process] = []
    netns: Netns | None = None
    link: Link | None = None
    for s in Plan.SECTIONS:
        a, b = getattr(big, s), getattr(small, s)
        sb = set(b)
        extra = [o for o in a if o not in sb]
        if [o for o in b if o not in set(a)]:
            raise UsageError(f"waypoint {ref}: {s} would change elsewhere too; not a live change")
        for o in extra:
            if isinstance(o, Process) and o.ref == ref:
                procs.append(o)
            elif isinstance(o, Netns) and o.name == pod.netns:
                netns = o
            elif isinstance(o, Link) and o.name == pod.host_veth and o.peer_netns == pod.netns:
                link = o
            elif mine(o):
                objs.append(o)
            else:
                raise UsageError(f"waypoint {ref}: would change {o.describe()}; not a live change")
    if netns is None or link is None:
        raise UsageError(f"waypoint {ref}: no netns or veth in the plan")
    d = PodDelta(pod=pod, netns=netns, link=link, objs=objs, processes=procs)
    svc_old = {f"{x.namespace}/{x.name}": x for x in old.services}
    for svc in new.services:
        was = svc_old.get(f"{svc.namespace}/{svc.name}")
        if was is None or was.endpoints != svc.endpoints or was.vip != svc.vip:
            raise UsageError(f"service {svc.namespace}/{svc.name} would change more than its waypoint")
        if was.waypoint != svc.waypoint:
            d.services[f"{svc.namespace}/{svc.name}"] = (was.waypoint, svc.waypoint)
    return d
