"""CLI commands around a lab: doctor, rules, stats, logs --conn, list; and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from netlab.lab import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]
NETLAB = [sys.executable, "-m", "netlab.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, *args], capture_output=True, text=True, timeout=60)


def test_doctor_reports_every_feature_and_passes_here() -> None:
    r = run("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    for name in ("netns", "veth", "bridge", "tun/tap", "TPROXY", "ipset hash:ip", "mark/connmark", "python-iptables"):
        assert checks[name]["ok"], checks[name]
    assert checks["geneve"]["required"] is False  # userspace Geneve covers a kernel without it
    assert r.returncode == 0


@pytest.fixture(scope="module")
def s1():
    lab = Lab.up("ambient-to-sidecar", name="cli-s1", tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab("cli-s1")


def test_rules_shows_the_live_datapath_of_a_node_and_a_ztunnel(s1: Lab) -> None:
    node = json.loads(run("rules", "--lab", "cli-s1", "node-a", "--json").stdout)
    assert "-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100" in node["iptables"]
    assert "fwmark 0x200/0x200 goto 32766" in node["ip rules"]
    assert "default via 192.168.127.2 dev istioout table 101" in node["routes"]
    assert "ztunnel-pods-ips" in node["ipsets"] and s1.plan.pod("foo/sleep").ip in node["ipsets"]
    assert "istioout" in node["tunnels"]
    zt = run("rules", "--lab", "cli-s1", "ztunnel:node-a").stdout
    assert "TPROXY --on-port 15001" in zt and "pistioout" in zt


def test_stats_and_connection_legs(s1: Lab) -> None:
    assert s1.exec_capture("foo/sleep", ["curl", "-s", "--max-time", "5", "http://httpbin.bar:8000/get"]).returncode == 0
    st = json.loads(run("stats", "--lab", "cli-s1", "--json").stdout)
    kinds = {p["kind"] for p in st["processes"]}
    assert {"ztunnel", "sidecar", "app", "geneve"} <= kinds
    assert all(p["rss_kib"] > 0 for p in st["processes"])
    assert st["nodes"]["node-a"]["proxies"] == 1 and st["nodes"]["node-b"]["proxies"] == 2  # ztunnel; ztunnel + sidecar
    legs = []
    for _ in range(40):  # a leg is written when its connection ends
        legs = json.loads(run("logs", "--lab", "cli-s1", "--conn", "--json").stdout)
        if {g["component"] for g in legs} >= {"ztunnel-node-a", "httpbin.bar-sidecar"}:
            break
    assert {g["component"] for g in legs} >= {"ztunnel-node-a", "httpbin.bar-sidecar"}


def test_unknown_pod_and_lab_are_one_line_errors(s1: Lab) -> None:
    r = run("exec", "--lab", "cli-s1", "nope", "--", "true")
    assert r.returncode == 2 and "no pod 'nope'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("status", "no-such-lab")
    assert r.returncode == 2 and "no lab named 'no-such-lab'" in r.stderr


def test_logs_prints_a_process_output(s1: Lab) -> None:
    """`netlab logs COMPONENT` printed nothing: Lab.logs built the tail generator and dropped it."""
    r = run("logs", "--lab", "cli-s1", "ztunnel-node-a", "-n", "200")
    assert r.returncode == 0, r.stderr
    assert any(json.loads(line).get("event") == "ready" for line in r.stdout.splitlines() if line.startswith("{"))
    r = run("logs", "--lab", "cli-s1")
    assert r.returncode == 0 and "ztunnel-node-a" in r.stdout.split("components: ", 1)[1]
    r = run("logs", "--lab", "cli-s1", "nope")
    assert r.returncode == 2 and "no component 'nope'" in r.stderr
