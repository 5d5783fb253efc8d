"""ztunnel with a waypoint (reference §7): ambient client -> waypoint -> destination ztunnel, the
plaintext hairpin, and 401 for a caller that bypasses the waypoint. Needs netlab.mesh.waypoint."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab.lab import Lab
from netlab.mesh.connlog import read_legs

pytestmark = pytest.mark.kernel

TOPOLOGY = """\
name: hz-wp
nodes: [{name: node-a}, {name: node-b}, {name: node-c}]
namespaces:
  amb: {labels: {istio.io/dataplane-mode: ambient}}
  legacy: {}
  bar-2: {labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: sleep, namespace: amb, node: node-a, app: sleep, serviceAccount: sleep}
  - {name: sleep, namespace: legacy, node: node-a, app: sleep}
  - {name: helloworld, namespace: bar-2, node: node-b, app: helloworld, serviceAccount: helloworld, ports: [5000]}
services:
  - {name: helloworld, namespace: bar-2, port: 5000, targetPort: 5000, selector: {app: helloworld}}
waypoints:
  - {namespace: bar-2, node: node-c}
"""
CURL = ["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    d = tmp_path_factory.mktemp("hz-wp")
    mp = pytest.MonkeyPatch()
    mp.setenv("NETLAB_RUN_DIR", str(d / "run"))
    topo = d / "hz-wp.yaml"
    topo.write_text(TOPOLOGY)
    lab = Lab.up(str(topo), name="hz-wp", tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab("hz-wp")
        mp.undo()


@pytest.fixture(autouse=True)
def netlab_run_dir(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETLAB_RUN_DIR", str(lab.state_dir.parent))


def legs(lab: Lab, component: str) -> list[dict]:
    return read_legs(Path(lab.state_dir) / "conn" / f"{component}.jsonl")


def new_legs(lab: Lab, component: str, before: int, want: int = 1, timeout: float = 3.0) -> list[dict]:
    """Legs logged after the first ``before`` ones. A leg is written when its relay has finished,
    which can be a moment after the client already has its answer, so wait for ``want`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        got = read_legs(Path(lab.state_dir) / "conn" / f"{component}.jsonl")[before:]
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def curl(lab: Lab, pod: str, url: str) -> tuple[int, str]:
    r = lab.exec_capture(pod, [*CURL, url])
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.mark.parametrize("via", ["vip", "pod"])
def test_ambient_client_goes_through_the_waypoint(lab: Lab, via: str) -> None:
    hw, wp, sleep = lab.pod("bar-2/helloworld").ip, lab.pod("bar-2/waypoint").ip, lab.pod("amb/sleep").ip
    svc = next(s for s in lab.plan.services if s.name == "helloworld")
    orig = f"{svc.vip}:{svc.port}" if via == "vip" else f"{hw}:5000"
    host = "helloworld.bar-2:5000" if via == "vip" else orig
    na, nb = len(legs(lab, "ztunnel-node-a")), len(legs(lab, "ztunnel-node-b"))
    code, body = curl(lab, "amb/sleep", f"http://{host}/hello")
    assert code == 200 and "Hello version" in body, body
    [out] = new_legs(lab, "ztunnel-node-a", na)
    assert out["extra"]["route"] == "waypoint" and out["up_dst"] == f"{wp}:15008"
    assert out["authority"] == orig  # the original destination, not the resolved pod
    assert out["up_src"].startswith(sleep + ":")
    assert out["dst_id"] == "spiffe://cluster.local/ns/bar-2/sa/waypoint-istio-waypoint"
    [inn] = new_legs(lab, "ztunnel-node-b", nb)
    assert inn["listener"] == "inbound:15008" and inn["extra"].get("via_waypoint") is True
    assert inn["src_id"] == out["dst_id"] and inn["up_dst"] == f"{hw}:5000"
    assert inn["up_src"].startswith(wp + ":")  # the waypoint sends no Forwarded: the pod sees the waypoint


def test_plaintext_to_pod_with_waypoint_hairpins_unspoofed(lab: Lab) -> None:
    hw, wp = lab.pod("bar-2/helloworld").ip, lab.pod("bar-2/waypoint").ip
    zt_b = next(p.ip for p in lab.plan.pods if p.mode == "ztunnel" and p.node == "node-b")
    nb = len(legs(lab, "ztunnel-node-b"))
    code, body = curl(lab, "legacy/sleep", f"http://{hw}:5000/hello")
    assert code == 200, body
    got = new_legs(lab, "ztunnel-node-b", nb, want=2)  # the hairpin leg, and the waypoint's leg coming back
    pt = next(g for g in got if g["listener"] == "inbound-plaintext:15006")
    assert pt["extra"]["route"] == "hairpin" and pt["up_dst"] == f"{wp}:15008"
    assert pt["up_src"].startswith(zt_b + ":")  # ztunnel's own IP: spoofing off for the hairpin
    assert pt["src"].startswith(lab.pod("legacy/sleep").ip + ":")
    assert pt["src_id"] == "spiffe://cluster.local/ns/legacy/sa/default"


def test_bypassing_the_waypoint_is_401(lab: Lab) -> None:
    from netlab.mesh import hbone
    from netlab.mesh.bootstrap import MeshContext

    ctx = MeshContext.for_lab(lab.name)
    cert, key = ctx.cert_for("spiffe://cluster.local/ns/amb/sa/sleep")
    hw = lab.pod("bar-2/helloworld").ip
    box: dict[str, object] = {}
    nb = len(legs(lab, "ztunnel-node-b"))

    async def main() -> None:
        try:
            await hbone.hbone_connect((hw, 15008), f"{hw}:5000", client_cert=cert, client_key=key, ca=ctx.ca_cert,
                                      expected_identity="spiffe://cluster.local/ns/bar-2/sa/helloworld", timeout=5)
            box["r"] = 200
        except hbone.HboneError as e:
            box["r"] = e.status

    def run() -> None:
        with ns.in_netns(lab.netns_of("ztunnel:node-a")):
            asyncio.run(main())

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert box["r"] == 401
    [last] = new_legs(lab, "ztunnel-node-b", nb)
    assert last["outcome"] == "401" and last["extra"]["reason"] == "BypassWaypoint"
