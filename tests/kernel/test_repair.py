"""A dead supervisor is visible, and `netlab up --repair` brings the lab's processes back.

SIGKILL of a lab's supervisor takes every process with it (they die with their parent) and
nothing restarts them. `status` must say so -- the lab degraded, each process dead, with its pid
-- `stats` must not list the dead pids, and `up --repair` must start them again under a new
supervisor without touching a namespace, after which requests flow again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from netlab import netns as ns
from netlab.lab import Lab, state_dir
from netlab.runtime import procfs

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]
NETLAB = [sys.executable, "-m", "netlab.cli"]
LAB = "hz-rep"


def netlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, *args], capture_output=True, text=True, timeout=120)


def request_ok(lab: Lab) -> bool:
    r = lab.exec_capture("foo/sleep", ["curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}",
                                       "http://httpbin.bar:8000/get"], timeout=10)
    return r.stdout.strip() == "200"


def test_dead_supervisor_shows_degraded_and_up_repair_brings_the_processes_back() -> None:
    lab = Lab.up("ambient-to-sidecar", name=LAB, tunnel="userspace")
    try:
        assert request_ok(lab)
        sd = state_dir(LAB)
        sup = json.loads((sd / "supervisor.json").read_text())
        before = json.loads(netlab("status", LAB, "--json").stdout)
        assert before["health"] == "up" and before["problems"] == []
        assert {p["state"] for p in before["processes"]} == {"running"}
        old = {p["name"]: p["pid"] for p in before["processes"]}
        netns_before = {n: ns.netns_id(n) for n in ns.list_netns() if n.startswith(f"{LAB}-")}

        os.kill(sup["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(procfs.alive(pid) for pid in old.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(procfs.alive(pid) for pid in old.values()), "the processes outlived their supervisor"
        assert not request_ok(lab)

        st = json.loads(netlab("status", LAB, "--json").stdout)
        assert st["health"] == "degraded" and st["supervisor"] == {"pid": sup["pid"], "state": "dead"}, st
        states = {p["name"]: (p["state"], p["pid"]) for p in st["processes"]}
        assert states == {n: ("dead", pid) for n, pid in old.items()}
        assert f"supervisor (pid {sup['pid']}) is dead" in st["problems"], st["problems"]
        assert any(p.startswith("dead: ") and "ztunnel-node-a" in p for p in st["problems"]), st["problems"]
        text = netlab("status", LAB).stdout
        assert "degraded" in text and f"netlab up --repair {LAB}" in text, text
        assert json.loads(netlab("stats", "--lab", LAB, "--json").stdout)["processes"] == []

        r = netlab("up", "--repair", LAB)
        assert r.returncode == 0, r.stderr
        assert "supervisor" in r.stdout and "dead" in r.stdout, r.stdout
        st = json.loads(netlab("status", LAB, "--json").stdout)
        assert st["health"] == "up" and {p["state"] for p in st["processes"]} == {"running"}, st
        assert all(p["pid"] != old[p["name"]] and procfs.alive(p["pid"]) for p in st["processes"])
        assert {n: ns.netns_id(n) for n in ns.list_netns() if n.startswith(f"{LAB}-")} == netns_before
        assert request_ok(lab)
        again = netlab("up", "--repair", LAB)
        assert again.returncode == 0 and "nothing to repair" in again.stdout, again.stdout + again.stderr
    finally:
        Lab.down_lab(LAB)
    assert [n for n in ns.list_netns() if n.startswith(f"{LAB}-")] == []
