"""``netlab waypoint add|rm``: a waypoint added to or removed from a running lab, as istiod and
the mesh controller do it (``istioctl waypoint apply|delete``), no other process restarted.

The change is a pod delta (:func:`netlab.plan.waypoints.pod_delta`: the plan as it stands vs the
plan with one more, or one fewer, ``waypoints:`` entry, both from the same builders as `up`),
carried out in this order:

* add: the waypoint's identity gets its certificate and its proxy its connection log (istiod,
  the mesh controller); its netns, veth, addresses and routes are made, ledger first
  (:mod:`netlab.kernel.livepod`); the supervisor starts and supervises its proxy (a start
  request, :func:`netlab.runtime.supervisor.start_process`); once it is ready the registry is
  rewritten in place (istiod's push), so ztunnels send through it from their next connection.
* rm: the registry first (traffic goes direct again from the next connection), then the
  proxy is stopped, then its netns (with its veth) is deleted.

The changes so far are kept in the state directory's ``waypoints.json`` (as `netlab label`
keeps ``labels.json``), the plan file is replaced by the new plan, and the lab is locked
meanwhile. A command killed half-way is finished by running it again; ``down`` removes all.
"""

from __future__ import annotations

import os
from typing import Any

from netlab import testhooks
from netlab.errors import LabStateError, NetlabError, UsageError
from netlab.kernel import ledger as kledger
from netlab.kernel import livepod
from netlab.kernel.failures import ObjectError
from netlab.mesh import connlog
from netlab.mesh.bootstrap import CA_DIR, CONN_LOG_DIR
from netlab.mesh.ca import LabCA
from netlab.mesh.registry import Registry, build_registry
from netlab.mesh.relabel import current_topology, read_overrides, read_waypoint_ops, rebuild, write_waypoint_ops
from netlab.plan.types import Plan
from netlab.plan.waypoints import PodDelta, WaypointChange, check_change, pod_delta
from netlab.runtime.supervisor import SupervisorError, start_process, stop_process
from netlab.state import CONN_SUFFIX, StateDir


def change_waypoint(lab: str, ch: WaypointChange) -> dict[str, Any]:
    """Make ``ch`` in running lab ``lab``; a summary (the pod, its objects, its process PID)."""
    files = StateDir.of(lab)
    if not files.plan.exists():
        raise UsageError(f"no lab {lab!r} is up (`netlab status` lists the labs)")
    kledger.take_lock(lab)
    try:
        plan = kledger.read_plan(lab)
        if not any(p.kind == "ztunnel" for p in plan.processes):
            raise UsageError(f"lab {lab} runs no ztunnel (no ambient namespace, or up with --no-mesh); "
                             "a waypoint serves ambient workloads")
        ov, wops = read_overrides(files), read_waypoint_ops(files)
        if rebuild(plan, ov, wops) != plan:
            raise LabStateError(f"lab {lab}: its topology file {plan.source} no longer gives the plan the lab runs "
                                f"(edited since `up`?); a waypoint change needs it unchanged")
        op = check_change(current_topology(plan, ov, wops), ch)
        new_ops = [*wops, op]
        new = rebuild(plan, ov, new_ops)
        ref = f"{op['namespace']}/{op['name']}"
        delta = pod_delta(plan, new, ref)
        try:
            pid = None
            if ch.op == "add":
                pid = _add(plan, new, delta, files)
            else:
                _remove(plan, new, delta, files)
        except (ObjectError, OSError, SupervisorError) as e:
            raise NetlabError(f"lab {lab}: {ch.describe()}: {e}; run the command again to finish it "
                              f"(`netlab down` removes all)") from e
        write_waypoint_ops(files, new_ops)
        return {"lab": lab, "change": ch.describe(), "datapath": plan.datapath, "op": ch.op, **delta.to_dict(),
                "pid": pid}
    finally:
        kledger.release_lock(lab)


def _add(old: Plan, new: Plan, d: PodDelta, files: StateDir) -> int | None:
    reg = build_registry(new)
    me = reg.pod(d.pod.ref)
    if me is None:
        raise LabStateError(f"no workload for waypoint {d.pod.ref} in the registry")
    LabCA.open(files.path / CA_DIR, trust_domain=reg.trust_domain).issue(me.identity)
    for p in d.processes:
        connlog.prepare(files.path / CONN_LOG_DIR / f"{p.name}{CONN_SUFFIX}", p.uid, p.gid)
    w = kledger.Ledger.append_to(old.lab)
    try:
        w.note("waypoint-add", pod=d.pod.ref, pid=os.getpid())
        livepod.add_pod(d.netns, d.link, d.objs, cookies=kledger.netns_cookies(old.lab), ledger=w)
        if testhooks.ARMED:
            testhooks.point("waypoint:pod-made")
        # the waypoint finds itself in the registry, and no proxy sends to it until it is ready
        _with_workload(build_registry(old), reg, d.pod.ip).write_in_place(files.registry)
        pids = [start_process(files.path, p) for p in d.processes]
        if testhooks.ARMED:
            testhooks.point("waypoint:started")
        reg.write_in_place(files.registry)  # istiod's push, once the proxy is ready
        w.write_plan(new)
        w.note("waypoint-added", pod=d.pod.ref, pid=os.getpid())
    finally:
        w.close()
    return pids[0] if pids else None


def _remove(old: Plan, new: Plan, d: PodDelta, files: StateDir) -> None:
    w = kledger.Ledger.append_to(old.lab)
    try:
        w.note("waypoint-rm", pod=d.pod.ref, pid=os.getpid())
        # no proxy sends to it from now on; it still finds itself until it is stopped
        _with_workload(build_registry(new), build_registry(old), d.pod.ip).write_in_place(files.registry)
        for p in d.processes:
            stop_process(files.path, p.name)
        if testhooks.ARMED:
            testhooks.point("waypoint:stopped")
        build_registry(new).write_in_place(files.registry)
        livepod.remove_pod(d.netns.name, kledger.netns_cookies(old.lab).get(d.netns.name))
        w.write_plan(new)
        w.note("waypoint-removed", pod=d.pod.ref, pid=os.getpid())
    finally:
        w.close()


def _with_workload(reg: Registry, other: Registry, ip: str) -> Registry:
    """``reg`` with ``other``'s workload at ``ip`` (the waypoint's own entry) and nothing else of it."""
    reg.workloads[ip] = other.workloads[ip]
    return reg


__all__ = ["WaypointChange", "change_waypoint"]
