"""Lab engine end to end: up, reachability, status, down, crash cleanup, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab.lab import Lab, state_dir

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]

NETLAB = [sys.executable, "-m", "netlab.cli"]


def lab_leftovers(lab: str) -> list[str]:
    """Everything a lab could leave behind on the host, by name."""
    left = [n for n in ns.list_netns() if n.startswith(f"{lab}-")]
    if state_dir(lab).exists():
        left.append(str(state_dir(lab)))
    etc = Path("/etc/netns")
    if etc.is_dir():
        left += [str(p) for p in etc.iterdir() if p.name.startswith(f"{lab}-")]
    return left


def ping(netns: str, ip: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", netns, "ping", "-c1", "-W2", "-q", ip],
                          capture_output=True).returncode == 0


@pytest.fixture
def two_nodes():
    lab = Lab.up("two-nodes", name="nlt-2n", tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab("nlt-2n")


def test_every_pod_pings_every_other_and_status_lists_them(two_nodes: Lab) -> None:
    pods = [p for p in two_nodes.plan.pods]
    assert len(pods) == 4
    failures = [(a.ref, b.ref) for a in pods for b in pods if a is not b and not ping(a.netns, b.ip)]
    assert not failures, f"no reachability: {failures}"

    r = subprocess.run([*NETLAB, "status", "nlt-2n", "--json"], capture_output=True, text=True, check=True)
    st = json.loads(r.stdout)
    assert st["lab"] == "nlt-2n" and st["topology"] == "two-nodes"
    assert {p["name"]: (p["node"], p["mode"]) for p in st["pods"]} == {
        "a1": ("node-a", "plain"), "a2": ("node-a", "plain"), "b1": ("node-b", "plain"), "b2": ("node-b", "plain")}
    for p in st["pods"]:
        assert p["netns"] in ns.list_netns()
        out = subprocess.run(["ip", "-n", p["netns"], "-4", "-o", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True).stdout
        assert f"inet {p['ip']}/32" in out
    assert {n["name"] for n in st["nodes"]} == {"node-a", "node-b"}
    assert st["services"] == [{"name": "web", "namespace": "default", "vip": "10.96.0.10", "port": 8000,
                               "target_port": 80}]


def test_fabric_bridges_cross_node_frames_without_its_iptables(two_nodes: Lab) -> None:
    """The fabric is a plain switch: where br_netfilter is loaded (this machine), a bridge would
    otherwise pass every cross-node frame through the fabric netns's iptables. A counting rule
    in the fabric's FORWARD chain must see none of a cross-node ping."""
    fabric = next(n.name for n in two_nodes.plan.netns if n.role == "fabric")
    knob = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    ipt = ["ip", "netns", "exec", fabric, "iptables-legacy", "-w"]
    subprocess.run([*ipt, "-I", "FORWARD", "-j", "ACCEPT"], check=True)
    a1 = two_nodes.pod("a1")
    assert ping(a1.netns, two_nodes.pod("b1").ip)
    out = subprocess.run([*ipt, "-nvxL", "FORWARD"], capture_output=True, text=True, check=True).stdout
    pkts = int(out.splitlines()[2].split()[0])
    assert pkts == 0, f"{pkts} bridged packets went through {fabric}'s iptables"
    on = subprocess.run(["ip", "netns", "exec", fabric, "cat", str(knob)], capture_output=True, text=True)
    if on.returncode == 0:  # br_netfilter loaded: the plan turned it off in the fabric only
        assert on.stdout.strip() == "0"


def test_up_refuses_a_lab_that_is_already_up(two_nodes: Lab) -> None:
    r = subprocess.run([*NETLAB, "up", "two-nodes", "--name", "nlt-2n"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "already up" in r.stderr and len(r.stderr.strip().splitlines()) == 2  # progress header + the error


def test_down_removes_everything() -> None:
    Lab.up("two-nodes", name="nlt-down", tunnel="userspace")
    assert lab_leftovers("nlt-down")
    r = subprocess.run([*NETLAB, "down", "nlt-down"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert lab_leftovers("nlt-down") == []


def test_bad_topology_creates_nothing(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\nnodes: [{name: n1}]\nnamespaces: {}\npods: [{name: p, namespace: nope, node: n1}]\n")
    before = ns.list_netns()
    r = subprocess.run([*NETLAB, "up", str(f), "--name", "nlt-bad"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "namespace 'nope' is not defined" in r.stderr and "Traceback" not in r.stderr
    assert ns.list_netns() == before and lab_leftovers("nlt-bad") == []


def _big_topology(tmp_path: Path, pods: int) -> Path:
    lines = ["name: big", "nodes: [{name: n1, podCidr: 10.1.0.0/20}, {name: n2, podCidr: 10.2.0.0/20}]",
             "namespaces: {amb: {labels: {istio.io/dataplane-mode: ambient}}}", "pods:"]
    lines += [f"  - {{name: p{i}, namespace: amb, node: n{1 + i % 2}}}" for i in range(pods)]
    f = tmp_path / "big.yaml"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_kill9_during_up_then_down_leaves_nothing(tmp_path: Path) -> None:
    topo = _big_topology(tmp_path, 200)
    proc = subprocess.Popen([*NETLAB, "up", str(topo), "--name", "nlt-kill", "--tunnel", "userspace", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = state_dir("nlt-kill")
    deadline = time.monotonic() + 30
    # kill it once it is visibly midway: some namespaces made, not all
    while time.monotonic() < deadline:
        made = [n for n in ns.list_netns() if n.startswith("nlt-kill-")]
        if len(made) >= 40 or proc.poll() is not None:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "up finished before it could be killed midway; make the topology bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ledger.exists() and lab_leftovers("nlt-kill")
    r = subprocess.run([*NETLAB, "down", "nlt-kill"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert lab_leftovers("nlt-kill") == []
