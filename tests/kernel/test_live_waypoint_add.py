"""`netlab waypoint add|rm` on a running lab (issue 20's last point), both datapaths.

ambient-to-ambient: foo/sleep calls httpbin.bar:8000. Before: node-a's ztunnel dials httpbin's
15008 itself (no waypoint). ``netlab waypoint add bar``: no process of the lab restarts, no pod
moves, and the next request goes through the new waypoint (ztunnel dials its 15008, the
waypoint's own connection log has the request, trace shows a waypoint hop). ``netlab waypoint
rm bar``: direct again, and the waypoint's netns, veth and process are gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from netlab import netns as ns
from netlab.errors import UsageError
from netlab.lab import Lab
from netlab.verify.trace import trace
from tests.kernel.test_live_waypoint import upstream_via
from tests.labs import DATAPATHS, up_for_datapath

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", params=DATAPATHS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    yield from up_for_datapath("ambient-to-ambient", request.param, ("h20bk", "h20bi"))


def httpbin_via(lab: Lab) -> str:
    """Send foo/sleep -> httpbin.bar:8000; the upstream node-a's ztunnel dialled for it."""
    return upstream_via(lab, "foo/sleep", "http://httpbin.bar:8000/get", '"url": "http://httpbin.bar:8000/get"')


def pids(lab: Lab) -> dict[str, int]:
    return {p["name"]: p["pid"] for p in lab.health()["processes"]}


def node_links(lab: Lab, node: str) -> set[str]:
    r = subprocess.run(["ip", "netns", "exec", lab.plan.nodes[[n.name for n in lab.plan.nodes].index(node)].netns,
                        "ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in r.stdout.splitlines()}


def test_waypoint_add_then_rm_live(lab: Lab) -> None:
    httpbin = lab.plan.pod("bar/httpbin")
    others = {p.ref: p.ip for p in lab.plan.pods}
    before = pids(lab)
    assert httpbin_via(lab) == f"{httpbin.ip}:15008"  # direct: no waypoint yet

    res = lab.waypoint("add", "bar")
    wp = lab.plan.pod("bar/waypoint")
    assert res["pod"] == "bar/waypoint" and res["ip"] == wp.ip and wp.mode == "waypoint" and wp.node == "node-b"
    assert {p.ref: p.ip for p in lab.plan.pods if p.ref != wp.ref} == others  # no pod moved
    after = pids(lab)
    assert {k: v for k, v in after.items() if k in before} == before  # no process restarted
    assert after["waypoint.bar"] == res["pid"]
    assert any(p["name"] == "waypoint" and p["mode"] == "waypoint" for p in lab.status()["pods"])
    assert ns.netns_id(wp.netns) is not None and wp.host_veth in node_links(lab, "node-b")

    n = len(lab.connection_legs("waypoint.bar"))
    assert httpbin_via(lab) == f"{wp.ip}:15008"  # ztunnel sends it to the waypoint now
    deadline = time.monotonic() + 3  # the waypoint logs its leg when its relay ends, after the reply
    while len(lab.connection_legs("waypoint.bar")) <= n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lab.connection_legs("waypoint.bar")) > n  # and the waypoint proxied it
    t = trace(lab, "foo/sleep", "httpbin.bar:8000", "/get")
    assert any(h.kind == "waypoint" or h.at.startswith("waypoint:") for h in t.hops), [h.at for h in t.hops]

    res = lab.waypoint("rm", "bar")
    assert res["pod"] == "bar/waypoint"
    assert httpbin_via(lab) == f"{httpbin.ip}:15008"  # direct again
    assert "waypoint.bar" not in pids(lab)
    assert pids(lab) == before
    assert ns.netns_id(wp.netns) is None and wp.host_veth not in node_links(lab, "node-b")
    assert not any(p.mode == "waypoint" for p in lab.plan.pods)
    assert {p.ref: p.ip for p in lab.plan.pods} == others


def test_waypoint_bad_input_exits_2_and_changes_nothing(lab: Lab) -> None:
    plan = lab.plan
    with pytest.raises(UsageError, match="no waypoint"):
        lab.waypoint("rm", "bar")
    with pytest.raises(UsageError, match="no namespace"):
        lab.waypoint("add", "nope")
    for argv in (["add", "nope"], ["rm", "foo"], ["add", "foo", "--node", "node-z"]):
        r = subprocess.run([sys.executable, "-m", "netlab.cli", "waypoint", *argv, "--lab", lab.name],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (argv, r)
    r = subprocess.run([sys.executable, "-m", "netlab.cli", "waypoint", "add", "bar", "--lab", "h20b-none"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r
    assert Lab.attach(lab.name).plan == plan


def test_down_removes_a_waypoint_added_again_after_rm() -> None:
    """A waypoint removed and added again has the same netns name with a new identity: `down`
    removes that one too (the ledger holds both makings), and with it the waypoint's process."""
    from netlab.state import StateDir

    lab = Lab.up("ambient-to-ambient", name="h20bd")
    try:
        lab.waypoint("add", "bar")
        lab.waypoint("rm", "bar")
        lab.waypoint("add", "bar", node="node-a")
        wp = lab.plan.pod("bar/waypoint")
        assert wp.node == "node-a" and ns.netns_id(wp.netns) is not None
        pid = pids(lab)["waypoint.bar"]
    finally:
        msg = lab.down()
    assert "left in place" not in msg, msg
    assert ns.netns_id(wp.netns) is None
    assert not any(n.startswith("h20bd-") for n in ns.list_netns())
    assert not StateDir.of("h20bd").path.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("point", ["netns:h20bk-bar-waypoint", "waypoint:pod-made", "waypoint:started"])
def test_a_waypoint_add_killed_half_way_is_finished_by_running_it_again(lab: Lab, point: str) -> None:
    """SIGKILL while the pod is made (before its netns takes its name), after its kernel objects,
    after its proxy started: the plan does not have it yet, the same command again finishes it
    (the request goes through it), and `rm` killed after the proxy stopped is finished too."""
    if lab.plan.datapath == "inpod":
        point = point.replace("h20bk", "h20bi")
    httpbin = lab.plan.pod("bar/httpbin")
    argv = [sys.executable, "-m", "netlab.cli", "waypoint", "add", "bar", "--lab", lab.name]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NETLAB_TEST_SIGNAL_AT": f"KILL@{point}"})
    assert r.returncode == -9, r.stderr
    assert not any(p.mode == "waypoint" for p in Lab.attach(lab.name).plan.pods)  # not recorded: not done
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lab.plan = Lab.attach(lab.name).plan
    wp = lab.plan.pod("bar/waypoint")
    assert httpbin_via(lab) == f"{wp.ip}:15008"
    argv[4] = "rm"
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NETLAB_TEST_SIGNAL_AT": "KILL@waypoint:stopped"})
    assert r.returncode == -9, r.stderr
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lab.plan = Lab.attach(lab.name).plan
    assert httpbin_via(lab) == f"{httpbin.ip}:15008"
    assert ns.netns_id(wp.netns) is None and "waypoint.bar" not in pids(lab)


def test_a_sidecar_routes_through_a_waypoint_added_live_1_18() -> None:
    """1.18 sidecars send to an ambient endpoint's waypoint (EDS's tunnel address, 1.18 reference
    §5.2): sidecar-to-ambient's foo/sleep (sidecar) -> httpbin.bar-1 goes through bar-1's new
    waypoint with no restart of the sidecar, and straight to httpbin's 15008 after rm."""
    lab = Lab.up("sidecar-to-ambient", name="h20bs")
    try:
        httpbin = lab.plan.pod("bar-1/httpbin")
        before = pids(lab)

        def via() -> str:
            return upstream_via(lab, "foo/sleep", "http://httpbin.bar-1:8000/get", '"url"', "sleep.foo-sidecar")

        assert via() == f"{httpbin.ip}:15008"
        lab.waypoint("add", "bar-1")
        wp = lab.plan.pod("bar-1/waypoint")
        assert via() == f"{wp.ip}:15008"
        lab.waypoint("rm", "bar-1")
        assert via() == f"{httpbin.ip}:15008"
        assert pids(lab) == before
        assert lab.plan.pod("bar-2/waypoint").ip == Lab.attach(lab.name).plan.pod("bar-2/waypoint").ip
    finally:
        lab.down()
