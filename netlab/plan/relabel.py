"""A live label change as a plan delta: what istio-cni adds or removes when a label changes.

`netlab label` changes a namespace's or pod's labels in a running lab. Kubernetes would not
restart a pod for it, and neither does the lab: the change is the difference between two plans,
both built by :func:`netlab.plan.build.build_plan` -- the lab's plan as it stands (the topology
file with the labels changed so far) and the same with this change -- so every object comes from
the same plan builders as at `up` (plan/ambient.py's §3 enrolment, plan/inpod.py's §1.2-§1.6 pod
rules and §2.1 probe ipset). Pure: no root, no kernel.

What a label change may touch is what istio-cni touches: ipset entries, routes, ip rules,
iptables chains and rules, sysctls. A change that would need anything else (a namespace, a
device, an address, a process, a file: a sidecar injected, ztunnels appearing) is refused with
the reason: in a cluster those take a pod restart or an install, not a label.

Removed sysctls are not undone: istio-cni's removal is "ipset del, route del, annotation removed"
(1.18 reference §3); the rp_filter=0 it wrote on the pod's veth stays.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from netlab import istio, names
from netlab.errors import UsageError
from netlab.plan.types import IptChain, IptRule, Plan, PodInfo
from netlab.topology.model import Topology

#: the keys `netlab label` acts on, and what each means (the others change nothing istio-cni sees)
LIVE_KEYS = {
    istio.LABEL_DATAPLANE_MODE: "enrol (ambient) or unenrol (anything else, or removed) without a restart",
    istio.LABEL_USE_WAYPOINT: "bind a namespace's Services to a waypoint (datapath inpod)",
}
LABEL_HELP = """\
Change a label of a running lab and do what istio-cni and istiod do about it, with no pod
restarted (every process keeps its PID):

  netlab label namespace/legacy istio.io/dataplane-mode=ambient    enrol every pod of legacy
  netlab label namespace/legacy istio.io/dataplane-mode-           unenrol them
  netlab label pod/legacy/sleep istio.io/dataplane-mode=none       (inpod) keep one pod out
  netlab label namespace/bar istio.io/use-waypoint=waypoint        (inpod) bind bar's Services

istio-1.18 (reference §3): enrolling adds the pod's entry in its node's ztunnel-pods-ips ipset,
its table-100 route and rp_filter=0 on its veth; unenrolling deletes the entry and the route.
inpod (inpod reference §2.3): the pod's own iptables, ip rule and route, then ZDS AddWorkload to
its node's ztunnel (through the istio-cni node agent), then the probe ipset; unenrolling undoes
that in reverse order (ipset entry, rules, DelWorkload). The proxies see the change at their
next connection. `netlab status` shows every pod's mode; `netlab rules NODE|POD` the rules.

Only istio.io/dataplane-mode and istio.io/use-waypoint act live. A change that needs more
(sidecar injection, the first ambient namespace of a lab with no ztunnel) is refused: in a
cluster it takes a pod restart or an install. Exit 1 if ztunnel did not ack a ZDS request.
"""

#: sections a label change may add to or remove from; any other difference is refused
LIVE_SECTIONS = ("sysctls", "ipset_entries", "ipt_chains", "ipt_rules", "routes", "rules")
FIXED_SECTIONS = ("netns", "links", "addresses", "ipsets", "files", "processes")

Overrides = dict[str, dict[str, str | None]]  # "namespace/NS" | "pod/NS/NAME" -> key -> value (None: removed)


@dataclass(frozen=True)
class LabelChange:
    """``netlab label TARGET KEY=VALUE`` (``value`` None: ``KEY-``, the label removed)."""

    target: str  # "namespace/NS" or "pod/NS/NAME"
    key: str
    value: str | None

    @property
    def kind(self) -> Literal["namespace", "pod"]:
        return "namespace" if self.target.startswith("namespace/") else "pod"

    def describe(self) -> str:
        return f"{self.target} {self.key}={self.value}" if self.value is not None else f"{self.target} {self.key}-"


def parse_change(target: str, assignment: str) -> LabelChange:
    """``namespace/NS`` or ``pod/NS/NAME``, and ``KEY=VALUE`` or ``KEY-``, as kubectl spells them."""
    parts = target.split("/")
    if not ((parts[0] == "namespace" and len(parts) == 2) or (parts[0] == "pod" and len(parts) == 3)):
        raise UsageError(f"target {target!r}: use namespace/NS or pod/NS/NAME")
    try:
        for p in parts[1:]:
            names.check_label(p, "name")
    except names.BadName as e:
        raise UsageError(f"target {target!r}: {e}") from None
    if assignment.endswith("-") and "=" not in assignment:
        key, value = assignment[:-1], None
    elif "=" in assignment:
        key, value = assignment.split("=", 1)
    else:
        raise UsageError(f"{assignment!r}: use KEY=VALUE to set a label or KEY- to remove it")
    if key not in LIVE_KEYS:
        known = "; ".join(f"{k}: {v}" for k, v in LIVE_KEYS.items())
        raise UsageError(f"label {key!r}: netlab label changes only what istio-cni acts on live ({known})")
    if value is not None:
        try:
            names.check_label(value, f"value of {key}")
        except names.BadName as e:
            raise UsageError(str(e)) from None
    return LabelChange(target, key, value)


def with_overrides(topo: Topology, overrides: Mapping[str, Mapping[str, str | None]]) -> Topology:
    """``topo`` with the label changes made so far (in order of the mapping) applied."""
    nss = {k: v.model_copy(deep=True) for k, v in topo.namespaces.items()}
    pods = [p.model_copy(deep=True) for p in topo.pods]
    for target, labels in overrides.items():
        parts = target.split("/")
        if parts[0] == "namespace":
            if parts[1] not in nss:
                raise UsageError(f"{target}: no namespace {parts[1]!r} in the lab (namespaces: {', '.join(sorted(nss))})")
            dest = nss[parts[1]].labels
        else:
            pod = next((p for p in pods if p.namespace == parts[1] and p.name == parts[2]), None)
            if pod is None:
                raise UsageError(f"{target}: no pod {parts[1]}/{parts[2]} in the lab")
            dest = pod.labels
        for k, v in labels.items():
            if v is None:
                dest.pop(k, None)
            else:
                dest[k] = v
    return topo.model_copy(update={"namespaces": nss, "pods": pods})


def add_override(overrides: Overrides, change: LabelChange) -> Overrides:
    out = {k: dict(v) for k, v in overrides.items()}
    out.setdefault(change.target, {})[change.key] = change.value
    return out


@dataclass
class PlanDelta:
    """What to add and to remove, each in plan order (sections in Plan.SECTIONS order)."""

    added: list[Any] = field(default_factory=list)
    removed: list[Any] = field(default_factory=list)
    modes: dict[str, tuple[str, str]] = field(default_factory=dict)  # pod ref -> (old, new) mode
    positions: dict[int, int] = field(default_factory=dict)  # id(added IptRule) -> 0-based position in its chain
    waypoints: dict[str, tuple[str, str]] = field(default_factory=dict)  # Service ref -> (old, new) waypoint ("": none)

    @property
    def empty(self) -> bool:
        return not self.added and not self.removed and not self.waypoints

    def to_dict(self) -> dict[str, Any]:
        return {"modes": {k: {"from": a, "to": b} for k, (a, b) in self.modes.items()},
                "waypoints": {k: {"from": a or None, "to": b or None} for k, (a, b) in self.waypoints.items()},
                "added": [o.describe() for o in self.added], "removed": [o.describe() for o in self.removed]}


def _chain_key(o: IptChain | IptRule) -> tuple[str, str, str]:
    return (o.netns, o.table, o.chain)


def plan_delta(old: Plan, new: Plan) -> PlanDelta:
    """The objects of ``new`` that ``old`` has not (added) and the reverse (removed); UsageError
    when the two differ anywhere a label change cannot reach."""
    for s in FIXED_SECTIONS:
        a, b = getattr(old, s), getattr(new, s)
        if a != b:
            gone = [o.describe() for o in a if o not in b][:1] + [o.describe() for o in b if o not in a][:1]
            raise UsageError(f"this change needs more than istio-cni does live ({s} would change: "
                             f"{'; '.join(gone) or 'order'}); in a cluster it takes a pod restart or an install")
    pods_old = {p.ref: p for p in old.pods}
    d = PlanDelta()
    for p in new.pods:
        q = pods_old.get(p.ref)
        if q is None or _without_mode(q) != _without_mode(p):
            raise UsageError(f"pod {p.ref} would change more than its mode; not a live change")
        if q.mode != p.mode:
            d.modes[p.ref] = (q.mode, p.mode)
    svc_old = {f"{x.namespace}/{x.name}": x for x in old.services}
    for svc in new.services:  # inpod: istio.io/use-waypoint binds Services (istiod's ServiceEntry.waypoint)
        ref = f"{svc.namespace}/{svc.name}"
        was = svc_old.get(ref)
        if was is None or was.endpoints != svc.endpoints or was.vip != svc.vip:
            raise UsageError(f"service {ref} would change more than its waypoint; not a live change")
        if was.waypoint != svc.waypoint:
            d.waypoints[ref] = (was.waypoint, svc.waypoint)
    for ref, (a, b) in d.modes.items():
        if "sidecar" in (a, b):
            raise UsageError(f"pod {ref}: {a} -> {b} needs the sidecar injected or removed, which takes a pod restart")
    for s in LIVE_SECTIONS:
        if s == "ipt_rules":
            continue
        a, b = getattr(old, s), getattr(new, s)
        sa, sb = set(a), set(b)
        d.added += [o for o in b if o not in sa]
        if s != "sysctls":  # istio-cni does not undo its sysctls (module docstring)
            d.removed += [o for o in a if o not in sb]
    _rule_delta(old, new, d)
    return d


def _without_mode(p: PodInfo) -> PodInfo:
    return PodInfo(**{**p.__dict__, "mode": "plain", "labels": ()})


def _rule_delta(old: Plan, new: Plan, d: PlanDelta) -> None:
    """Rules per chain: a chain made or removed takes its rules with it; in a chain both plans
    have, the rules that differ (a sequence diff, since one text may stand twice in a chain),
    each added at its position in the new chain."""
    chains_added = {_chain_key(c) for c in d.added if isinstance(c, IptChain)}
    chains_removed = {_chain_key(c) for c in d.removed if isinstance(c, IptChain)}
    by_old: dict[tuple[str, str, str], list[IptRule]] = {}
    by_new: dict[tuple[str, str, str], list[IptRule]] = {}
    for r in old.ipt_rules:
        by_old.setdefault(_chain_key(r), []).append(r)
    for r in new.ipt_rules:
        by_new.setdefault(_chain_key(r), []).append(r)
    for key in [*by_old, *[k for k in by_new if k not in by_old]]:
        a, b = by_old.get(key, []), by_new.get(key, [])
        if key in chains_added:
            d.added += b
            continue
        if key in chains_removed:
            d.removed += a  # (flushed with the chain)
            continue
        sm = difflib.SequenceMatcher(a=[r.spec for r in a], b=[r.spec for r in b], autojunk=False)
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            if op == "equal":
                continue
            d.removed += a[i1:i2]
            for j in range(j1, j2):
                d.added.append(b[j])
                d.positions[id(b[j])] = j
