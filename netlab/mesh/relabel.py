"""``netlab label``: change a running lab's labels and do what istio-cni and istiod do about it.

No pod is restarted and no process of the lab either. The change is a plan delta
(:func:`netlab.plan.relabel.plan_delta`, the plan as it stands vs the plan with this change, both
from the same plan builders as `up`), carried out in the reference's order:

* 1.18 (reference §3, CNI-POD ``addPodToMeshWithIptables`` / ``DelPodFromMesh``): enrolling adds
  the pod's ``ztunnel-pods-ips`` entry, its table-100 route and rp_filter=0 on its veth, on its
  node; unenrolling deletes the entry and the route.
* in-pod (inpod reference §2.3): enrolling installs the pod's rules (§1.2), hands its netns to
  ztunnel (ZDS ``AddWorkload``, through the node agent's request socket), then adds it to the
  node's probe ipset; unenrolling deletes the ipset entry, then the pod's rules
  (``DeleteInpodRules``: jumps, chains, ip rule, route), then sends ``DelWorkload``.
* istiod: the registry the proxies read is rewritten (a Workload's protocol follows its mode; a
  Service's waypoint its ``istio.io/use-waypoint``); every proxy sees it at its next lookup.

The lab's plan file is replaced by the new plan (``status`` shows every pod's mode from it) and
the changes so far are kept in the state directory's ``labels.json``, so the next change starts
from them. The lab is locked meanwhile (``down`` and ``up --repair`` wait), each added object is
in the ledger before it is made, and everything stays inside the lab's namespaces: ``down``
removes it all, also after a label command that was killed half-way (running it again finishes it).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from netlab import istio, testhooks
from netlab.errors import LabStateError, NetlabError, UsageError
from netlab.kernel import ledger as kledger
from netlab.kernel import live
from netlab.kernel.failures import ObjectError
from netlab.mesh.nodeagent.agent import request as agent_request
from netlab.mesh.registry import build_registry
from netlab.plan.build import build_plan
from netlab.plan.relabel import LabelChange, Overrides, PlanDelta, add_override, plan_delta, with_overrides
from netlab.plan.types import Plan
from netlab.plan.waypoints import WaypointOp, with_waypoints
from netlab.state import StateDir
from netlab.topology.load import load_topology
from netlab.topology.model import Topology

MESH_KINDS = ("ztunnel", "sidecar", "waypoint", "nodeagent")


def read_overrides(files: StateDir) -> Overrides:
    try:
        raw = json.loads(files.labels.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise LabStateError(f"{files.labels}: unreadable ({e})") from None
    return {str(t): {str(k): (None if v is None else str(v)) for k, v in d.items()} for t, d in raw.items()}


def _write_overrides(files: StateDir, ov: Overrides) -> None:
    tmp = files.labels.with_name(files.labels.name + ".tmp")
    tmp.write_text(json.dumps(ov, indent=1))
    tmp.rename(files.labels)


def read_waypoint_ops(files: StateDir) -> list[WaypointOp]:
    """The waypoints `netlab waypoint` added or removed since `up`, in order."""
    try:
        raw = json.loads(files.waypoints.read_text())
    except FileNotFoundError:
        return []
    except ValueError as e:
        raise LabStateError(f"{files.waypoints}: unreadable ({e})") from None
    return [{str(k): str(v) for k, v in d.items()} for d in raw]


def write_waypoint_ops(files: StateDir, ops: list[WaypointOp]) -> None:
    tmp = files.waypoints.with_name(files.waypoints.name + ".tmp")
    tmp.write_text(json.dumps(ops, indent=1))
    tmp.rename(files.waypoints)


def current_topology(plan: Plan, ov: Overrides, wops: list[WaypointOp] | None = None) -> Topology:
    """The lab's topology file with the label changes ``ov`` and the waypoint changes ``wops``
    (None: those recorded in the lab's state directory)."""
    if wops is None:
        wops = read_waypoint_ops(StateDir.of(plan.lab))
    return with_waypoints(with_overrides(load_topology(plan.source), ov), wops)


def rebuild(plan: Plan, ov: Overrides, wops: list[WaypointOp] | None = None) -> Plan:
    """The lab's plan from its topology file with the label changes ``ov`` and the waypoint
    changes ``wops`` (None: those made so far): what `up` would build for the lab as it is now.
    LabStateError if the file no longer gives back the plan the lab runs (it was edited since
    `up`): a delta from it would be a guess."""
    mesh = any(p.kind in MESH_KINDS for p in plan.processes)
    return build_plan(current_topology(plan, ov, wops), lab=plan.lab, tunnel=plan.tunnel, source=plan.source,
                      mesh=mesh, datapath=plan.datapath)


def relabel(lab: str, change: LabelChange) -> dict[str, Any]:
    """Make ``change`` in running lab ``lab``; a summary (what changed, the acks of ztunnel)."""
    files = StateDir.of(lab)
    kledger.take_lock(lab)
    try:
        plan = kledger.read_plan(lab)
        if change.key == istio.LABEL_USE_WAYPOINT and plan.datapath != istio.DATAPATH_INPOD:
            raise UsageError(f"{istio.LABEL_USE_WAYPOINT}: a label of the in-pod datapath's istiod; lab {lab} runs "
                             f"{plan.datapath} (1.18 binds waypoints by namespace or service account)")
        ov = read_overrides(files)
        if rebuild(plan, ov) != plan:
            raise LabStateError(f"lab {lab}: its topology file {plan.source} no longer gives the plan the lab runs "
                                f"(edited since `up`?); a label change needs it unchanged")
        new_ov = add_override(ov, change)
        new = rebuild(plan, new_ov)
        delta = plan_delta(plan, new)
        try:
            zds = _carry_out(plan, new, delta, files)
        except (ObjectError, OSError) as e:
            raise NetlabError(f"lab {lab}: {change.describe()}: {e}; the lab keeps its earlier labels "
                              f"(`netlab label` again finishes a change cut short; `netlab down` removes all)") from e
        _write_overrides(files, new_ov)
        return {"lab": lab, "change": change.describe(), "datapath": plan.datapath, **delta.to_dict(), "zds": zds,
                "ok": all(not a.get("error") for a in zds)}
    finally:
        kledger.release_lock(lab)


def _carry_out(old: Plan, new: Plan, delta: PlanDelta, files: StateDir) -> list[dict[str, Any]]:
    cookies = kledger.netns_cookies(old.lab)
    node_netns = {n.netns for n in old.nodes}
    pod_of = {p.ref: p for p in new.pods}
    enrol = [pod_of[r] for r, (_a, b) in delta.modes.items() if b == "ambient"]
    unenrol = [pod_of[r] for r, (a, _b) in delta.modes.items() if a == "ambient"]
    inpod = old.datapath == istio.DATAPATH_INPOD and any(p.kind == "nodeagent" for p in old.processes)

    def netns_of(objs: list[Any]) -> list[str]:
        seen = list(dict.fromkeys(o.netns for o in objs))
        for n in seen:
            if n not in cookies:
                raise LabStateError(f"lab {old.lab}: the ledger has no identity for netns {n}; not touching it")
        return seen

    def change(objs: list[Any], *, remove: bool, nodes: bool) -> None:
        pick = [o for o in objs if (o.netns in node_netns) == nodes]
        for n in netns_of(pick):
            mine = [o for o in pick if o.netns == n]
            if remove:
                live.change_netns(n, cookies[n], remove=mine)
            else:
                live.change_netns(n, cookies[n], add=mine, positions=delta.positions, ledger=w)

    w = kledger.Ledger.append_to(old.lab)
    acks: list[dict[str, Any]] = []
    try:
        w.note("label", modes={k: list(v) for k, v in delta.modes.items()}, pid=os.getpid())
        # removal: the node's ipset entries (and 1.18's route), the pods' rules, then DelWorkload
        change(delta.removed, remove=True, nodes=True)
        change(delta.removed, remove=True, nodes=False)
        if inpod:
            acks += [_zds(old, files, p.node, "del", p.ref) for p in unenrol]
        if testhooks.ARMED:
            testhooks.point("label:removed")
        # istiod's push, between the two: an unenrolled pod is plain once its capture is gone,
        # an enrolled one ambient before its capture starts
        build_registry(new).write_in_place(files.registry)
        change(delta.added, remove=False, nodes=False)
        if testhooks.ARMED:
            testhooks.point("label:pod-added")
        if inpod:
            acks += [_zds(old, files, p.node, "add", p.ref) for p in enrol]
        change(delta.added, remove=False, nodes=True)
        w.write_plan(new)
        w.note("labelled", pid=os.getpid())
    finally:
        w.close()
    return acks


def _zds(plan: Plan, files: StateDir, node: str, op: str, ref: str) -> dict[str, Any]:
    """One request to the node agent; its answer, with ``error`` set when ztunnel did not ack
    (the reference's ``redirection: pending``: the rules are live, no proxy: traffic is dropped)."""
    ctl = files.zds_control(node)
    try:
        if op == "del" and ref not in asyncio.run(agent_request(ctl, {"op": "list"})).get("pods", ()):
            return {"node": node, "op": op, "pod": ref, "error": None}  # gone already (a run cut short)
        res = asyncio.run(agent_request(ctl, {"op": op, "pod": ref}))
    except (OSError, TimeoutError, ValueError) as e:
        return {"node": node, "op": op, "pod": ref, "error": f"node agent istio-cni-{node}: {e}"}
    err = res.get("error") or "; ".join(str(a.get("error")) for a in res.get("acks", ()) if a.get("error"))
    if not res.get("acks") and op == "add" and not err:
        err = "no ztunnel connected to the node agent"
    return {"node": node, "op": op, "pod": ref, "error": err or None}


__all__ = ["NetlabError", "read_overrides", "rebuild", "relabel"]
