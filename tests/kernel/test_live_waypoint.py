"""``istio.io/use-waypoint`` changed live under the in-pod datapath (issue 20): coexistence's
bar-2 Service helloworld is bound to waypoint bar-2/waypoint (its ``waypoints:`` entry labels the
namespace); ``netlab label namespace/bar-2 istio.io/use-waypoint=none`` unbinds it and amb/sleep's
ztunnel goes straight to helloworld's 15008; removing the label binds it again and the request
goes through the waypoint. No process restarts; no kernel object changes (istiod's push alone).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from netlab.lab import Lab

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up("coexistence", name="h20w", datapath="inpod")
    try:
        yield lab
    finally:
        lab.down()


def upstream_via(lab: Lab, client: str, url: str, expect: str, ztunnel: str = "ztunnel-node-a") -> str:
    """Send ``client`` -> ``url`` (its body must hold ``expect``); the upstream ``ztunnel`` dialled
    for it (``ip:port``: the destination pod's 15008, or a waypoint's)."""
    src = lab.plan.pod(client)
    n = len(lab.connection_legs(ztunnel))
    r = lab.exec_capture(client, ["curl", "-s", "--max-time", "5", url], timeout=20)
    assert expect in r.stdout, r
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        legs = [g for g in lab.connection_legs(ztunnel)[n:] if g.src.startswith(f"{src.ip}:")]
        if legs:
            return legs[-1].up_dst
        time.sleep(0.05)
    raise AssertionError(f"no leg of {client}'s request on {ztunnel}")


def hello_via(lab: Lab) -> str:
    """Send amb/sleep -> helloworld.bar-2:5000; the upstream node-a's ztunnel dialled for it."""
    return upstream_via(lab, "amb/sleep", "http://helloworld.bar-2:5000/hello", "Hello version: v1")


def test_use_waypoint_rebinds_a_namespaces_services_live(lab: Lab) -> None:
    wp, hello = lab.plan.pod("bar-2/waypoint"), lab.plan.pod("bar-2/helloworld")
    pids = {p["name"]: p["pid"] for p in lab.health()["processes"]}
    assert hello_via(lab) == f"{wp.ip}:15008"
    res = lab.label("namespace/bar-2", "istio.io/use-waypoint=none")
    assert res["waypoints"] == {"bar-2/helloworld": {"from": "bar-2/waypoint", "to": None}}
    assert not res["added"] and not res["removed"] and not res["modes"]
    assert next(s for s in lab.plan.services if s.name == "helloworld").waypoint == ""
    assert hello_via(lab) == f"{hello.ip}:15008"
    res = lab.label("namespace/bar-2", "istio.io/use-waypoint-")
    assert res["waypoints"] == {"bar-2/helloworld": {"from": None, "to": "bar-2/waypoint"}}
    assert hello_via(lab) == f"{wp.ip}:15008"
    assert {p["name"]: p["pid"] for p in lab.health()["processes"]} == pids


def test_use_waypoint_naming_no_waypoint_is_refused(lab: Lab) -> None:
    from netlab.errors import NetlabError

    plan = lab.plan
    with pytest.raises(NetlabError, match="names waypoint 'nosuch'"):
        lab.label("namespace/bar-2", "istio.io/use-waypoint=nosuch")
    assert Lab.attach(lab.name).plan == plan
