"""The pure half of `netlab waypoint add|rm` (netlab/plan/waypoints.py): the lab with a waypoint
added is its topology's plan with one more ``waypoints:`` entry; no other pod moves (waypoints
take addresses from the top of the node's pod CIDR), and the delta is that pod's objects only."""

from __future__ import annotations

import pytest

from netlab.errors import UsageError
from netlab.plan.build import build_plan
from netlab.plan.types import Link, Netns, Process
from netlab.plan.waypoints import WaypointChange, check_change, pod_delta, with_waypoints
from netlab.topology.load import load_topology


@pytest.mark.parametrize("datapath", ["istio-1.18", "inpod"])
@pytest.mark.parametrize("topo_name", ["ambient-to-ambient", "coexistence"])
def test_adding_a_waypoint_moves_no_pod_and_the_delta_is_its_own(topo_name: str, datapath: str) -> None:
    topo = load_topology(topo_name)
    old = build_plan(topo, datapath=datapath)
    ns = next(n for n, x in topo.namespaces.items()
              if x.labels.get("istio.io/dataplane-mode") == "ambient" and not any(w.namespace == n for w in topo.waypoints))
    op = check_change(topo, WaypointChange("add", ns, "wp"))
    new = build_plan(with_waypoints(topo, [op]), datapath=datapath)
    assert [(p.ref, p.ip) for p in new.pods if p.ref != f"{ns}/wp"] == [(p.ref, p.ip) for p in old.pods]
    wp = new.pod(f"{ns}/wp")
    assert wp.mode == "waypoint"
    last = lambda ip: int(ip.rsplit(".", 1)[1])  # noqa: E731
    assert all(last(wp.ip) > last(p.ip) for p in old.pods if p.node == wp.node and p.mode != "waypoint")
    d = pod_delta(old, new, wp.ref)
    assert isinstance(d.netns, Netns) and d.netns.name == wp.netns
    assert isinstance(d.link, Link) and d.link.peer_netns == wp.netns
    assert [p.kind for p in d.processes] == ["waypoint"] and all(isinstance(p, Process) for p in d.processes)
    assert all(o.netns in (wp.netns, d.link.netns) for o in d.objs)
    back = pod_delta(new, old, wp.ref)  # rm: the same objects, the other way
    assert back.netns == d.netns and back.link == d.link and back.objs == d.objs
    assert build_plan(with_waypoints(topo, [op, {"op": "rm", "namespace": ns, "name": "wp"}]), datapath=datapath) == old


def test_waypoint_change_refuses_bad_input() -> None:
    topo = load_topology("coexistence")
    with pytest.raises(UsageError, match="no namespace"):
        check_change(topo, WaypointChange("add", "nope"))
    with pytest.raises(UsageError, match="has a waypoint already"):
        check_change(topo, WaypointChange("add", "bar-2"))
    with pytest.raises(UsageError, match="no waypoint"):
        check_change(topo, WaypointChange("rm", "bar-1"))
    with pytest.raises(UsageError, match="not ambient"):
        check_change(topo, WaypointChange("add", "legacy"))
    with pytest.raises(UsageError, match="no node"):
        check_change(topo, WaypointChange("add", "bar-1", node="node-z"))
    with pytest.raises(UsageError):
        check_change(topo, WaypointChange("add", "bar-1", name="Bad_Name"))


@pytest.mark.parametrize("datapath", ["istio-1.18", "inpod"])
def test_removing_a_waypoint_of_the_file_moves_no_pod(datapath: str) -> None:
    topo = load_topology("coexistence")
    old = build_plan(topo, datapath=datapath)
    op = check_change(topo, WaypointChange("rm", "bar-2"))
    new = build_plan(with_waypoints(topo, [op]), datapath=datapath)
    d = pod_delta(old, new, "bar-2/waypoint")
    assert [p.name for p in d.processes] == ["waypoint.bar-2"]
    assert [(p.ref, p.ip) for p in new.pods] == [(p.ref, p.ip) for p in old.pods if p.ref != "bar-2/waypoint"]
    if datapath == "inpod":  # the namespace's Service loses its binding (--enroll-namespace undone)
        assert d.services == {"bar-2/helloworld": ("bar-2/waypoint", "")}


def test_removing_a_waypoint_another_was_allocated_after_is_refused() -> None:
    topo = load_topology("coexistence")
    add = check_change(topo, WaypointChange("add", "bar-1", node="node-c"))  # after bar-2's on node-c
    two = with_waypoints(topo, [add])
    rm = check_change(two, WaypointChange("rm", "bar-2"))
    with pytest.raises(UsageError, match="would change another pod"):
        pod_delta(build_plan(two), build_plan(with_waypoints(two, [rm])), "bar-2/waypoint")
