"""`netlab label` on a running lab (issue 20): a plain namespace enrolled and unenrolled live, on
both datapaths, with no process of the lab (nor one of the pod's own) restarted.

plain-to-ambient has legacy/sleep (plain, node-a) and bar/httpbin (ambient, node-b). Enrolled,
sleep's next request goes through ztunnel (1.18: the trace matches ambient-to-ambient's
cross-node contract, with legacy/sleep for foo/sleep; inpod: node-a's ztunnel logs the leg from
inside sleep's netns); unenrolled, it does not (1.18: the trace matches plain-to-ambient's own
contract; inpod: no new leg), and nothing of the pod is left in the node's ipset, its table 100,
the pod's iptables, ip rules and routes, or the node agent's ZDS cache.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from netlab.lab import Lab
from netlab.mesh.nodeagent.agent import request
from netlab.topology.load import load_topology
from netlab.topology.model import RequestPath
from netlab.verify.trace import trace
from tests import reference_expect as X
from tests import reference_inpod_expect as I
from tests.labs import DATAPATHS, up_for_datapath

pytestmark = pytest.mark.kernel

NETLAB = [sys.executable, "-m", "netlab.cli"]


@pytest.fixture(scope="module", params=DATAPATHS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    yield from up_for_datapath("plain-to-ambient", request.param, ("h20l", "h20li"))


def pids(lab: Lab) -> dict[str, int]:
    procs = lab.health()["processes"]
    assert all(p["state"] == "running" for p in procs), procs
    return {p["name"]: p["pid"] for p in procs}


def ambient_contract() -> RequestPath:
    """ambient-to-ambient's cross-node hops (§8 A), from legacy/sleep instead of foo/sleep."""
    path = next(p for p in load_topology("ambient-to-ambient").paths if p.name == "cross-node")
    text = path.model_dump_json(by_alias=True).replace("foo/sleep", "legacy/sleep")
    return RequestPath.model_validate(json.loads(text))


def run(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, *argv], capture_output=True, text=True, timeout=60)


def netns_text(netns: str, *argv: str) -> str:
    """stdout of a command in ``netns`` (``ip route show table 100`` of a table no route is in
    exits 2 with nothing on stdout: nothing there, which is what is asked)."""
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True).stdout


def curl(lab: Lab) -> dict[str, Any]:
    r = lab.exec_capture("legacy/sleep", ["curl", "-s", "--max-time", "5", "http://httpbin.bar:8000/get"], timeout=20)
    assert r.returncode == 0, r
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def sleep_legs(lab: Lab, ip: str) -> list[Any]:
    return [g for g in lab.connection_legs("ztunnel-node-a") if g.src.startswith(f"{ip}:")]


def zds_pods(lab: Lab) -> list[str]:
    res = asyncio.run(request(lab.files.zds_control("node-a"), {"op": "list"}))
    return list(res["pods"])


def test_enrol_then_unenrol_a_namespace_live(lab: Lab) -> None:
    inpod = lab.plan.datapath == "inpod"
    sleep = lab.plan.pod("legacy/sleep")
    node_a = lab.plan.node("node-a").netns
    ipset = "istio-inpod-probes-v4" if inpod else "ztunnel-pods-ips"
    assert sleep.mode == "plain"
    before = pids(lab)
    # a process of the pod's own, which must live through both changes
    own = subprocess.Popen(["ip", "netns", "exec", sleep.netns, "sleep", "600"])
    try:
        # ---- enrol, with the CLI ----
        r = run(lab, "label", "--lab", lab.name, "namespace/legacy", "istio.io/dataplane-mode=ambient", "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["modes"] == {"legacy/sleep": {"from": "plain", "to": "ambient"}}
        assert [z["op"] for z in res["zds"]] == (["add"] if inpod else []) and res["ok"]
        lab.plan = lab.attach(lab.name).plan
        assert lab.plan.pod("legacy/sleep").mode == "ambient"
        st = json.loads(run(lab, "status", lab.name, "--json").stdout)
        assert {p["name"]: p["mode"] for p in st["pods"]}["sleep"] == "ambient"
        assert pids(lab) == before and own.poll() is None
        assert sleep.ip in netns_text(node_a, "ipset", "list", ipset)
        if inpod:
            assert "legacy/sleep" in zds_pods(lab)
            # the pod's rules are the reference's, in its order, as if it had been enrolled at `up`
            for table, text in I.pod_save(dns=lab.plan.dns_capture).items():
                got_save = netns_text(sleep.netns, "iptables-legacy-save", "-t", table)
                assert X.normalise_save(got_save, table) == text, table
            assert X.normalise_ip_rules(netns_text(sleep.netns, "ip", "rule", "show")) == I.pod_ip_rules()
            routes = X.split_route_tables(netns_text(sleep.netns, "ip", "-4", "route", "show", "table", "all"))
            assert {t: routes.get(str(t), []) for t in (100,)} == I.pod_routes()
            n = len(sleep_legs(lab, sleep.ip))
            got = curl(lab)
            legs = sleep_legs(lab, sleep.ip)
            deadline = time.monotonic() + 3  # a proxy writes the leg when the connection has ended
            while len(legs) == n and time.monotonic() < deadline:
                time.sleep(0.05)
                legs = sleep_legs(lab, sleep.ip)
            assert len(legs) == n + 1 and legs[-1].listener == "outbound:15001", legs
            assert legs[-1].extra.get("pod") == "legacy/sleep" and legs[-1].outcome == "ok"
            assert got["headers"]["Host"] == "httpbin.bar:8000"
        else:
            assert f"{sleep.ip} via 192.168.126.2 dev istioin" in netns_text(node_a, "ip", "route", "show", "table", "100")
            res_t = trace(lab, "legacy/sleep", "httpbin.bar:8000", "/headers", contract=ambient_contract())
            assert res_t.matched, res_t.render()

        # ---- unenrol, with the API ----
        res = lab.label("namespace/legacy", "istio.io/dataplane-mode-")
        assert res["modes"] == {"legacy/sleep": {"from": "ambient", "to": "plain"}} and res["ok"]
        assert lab.plan.pod("legacy/sleep").mode == "plain"
        assert pids(lab) == before and own.poll() is None
        assert sleep.ip not in netns_text(node_a, "ipset", "list", ipset)
        assert sleep.ip not in netns_text(node_a, "ip", "route", "show", "table", "100")
        save = netns_text(sleep.netns, "iptables-legacy-save")
        assert "ISTIO" not in save and "-A " not in save
        assert "lookup 100" not in netns_text(sleep.netns, "ip", "rule")
        assert not netns_text(sleep.netns, "ip", "route", "show", "table", "100").strip()
        if inpod:
            assert "legacy/sleep" not in zds_pods(lab)
            n = len(sleep_legs(lab, sleep.ip))
            curl(lab)
            time.sleep(1.0)  # (as long as a leg took to show up above, and more)
            assert len(sleep_legs(lab, sleep.ip)) == n  # not captured: no leg on node-a's ztunnel
        else:
            plain = next(p for p in load_topology("plain-to-ambient").paths if p.name == "plain-to-ambient")
            res_t = trace(lab, "legacy/sleep", "httpbin.bar:8000", "/headers", contract=plain)
            assert res_t.matched, res_t.render()
    finally:
        own.kill()
        own.wait()


def test_bad_label_requests_exit_2_and_change_nothing(lab: Lab) -> None:
    plan = lab.attach(lab.name).plan
    for argv, words in [
        (["namespace/nope", "istio.io/dataplane-mode=ambient"], "no namespace 'nope'"),
        (["namespace/legacy", "app=x"], "istio-cni acts on live"),
        (["deployment/x", "istio.io/dataplane-mode=ambient"], "namespace/NS or pod/NS/NAME"),
        (["namespace/legacy", "istio.io/dataplane-mode"], "KEY=VALUE"),
        (["namespace/bar", "istio-injection=enabled"], "istio-cni acts on live"),
    ]:
        r = run(lab, "label", "--lab", lab.name, *argv)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
    assert lab.attach(lab.name).plan == plan


KEEPALIVE = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8000), timeout=3)
def get():
    s.sendall(b"GET /ip HTTP/1.1\\r\\nHost: httpbin.bar\\r\\n\\r\\n")
    buf = b""
    while b"\\r\\n\\r\\n" not in buf:
        d = s.recv(4096)
        if not d:
            return "EOF"
        buf += d
    head, _, body = buf.partition(b"\\r\\n\\r\\n")
    n = next(int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\\r\\n")[1:]) if k.lower() == b"content-length")
    while len(body) < n:
        body += s.recv(4096)
    return head.split(b"\\r\\n")[0].decode()
print(get(), flush=True)
sys.stdin.readline()
try:
    print(get(), flush=True)
except OSError as e:
    print(type(e).__name__, flush=True)
"""


def across(lab: Lab, change: str) -> tuple[str, str]:
    """A keep-alive connection from sleep to httpbin's VIP: its first request's status line,
    then (after ``label namespace/legacy <change>``) its second's, or the error it got."""
    vip = next(s.vip for s in lab.plan.services if s.name == "httpbin")
    p = subprocess.Popen(["ip", "netns", "exec", lab.plan.pod("legacy/sleep").netns, "python3", "-c", KEEPALIVE, vip],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdin is not None and p.stdout is not None
        first = p.stdout.readline().strip()
        lab.label("namespace/legacy", change)
        p.stdin.write("\n")
        p.stdin.flush()
        return first, p.stdout.readline().strip()
    finally:
        p.kill()
        p.wait()


def test_established_connections_across_enrol_and_unenrol(lab: Lab) -> None:
    """What docs/live-labels.md says: an established connection is reset by enrolment on both
    datapaths; unenrolment leaves a connection ztunnel carries running under 1.18 (its packets
    follow connmark 0x210, not the ipset: §1.5 #8, §8 A step 8) and resets it under inpod
    (DelWorkload shuts the pod's proxy down at once)."""
    assert across(lab, "istio.io/dataplane-mode=ambient") == ("HTTP/1.1 200 OK", "ConnectionResetError")
    want = "ConnectionResetError" if lab.plan.datapath == "inpod" else "HTTP/1.1 200 OK"
    assert across(lab, "istio.io/dataplane-mode-") == ("HTTP/1.1 200 OK", want)


def test_a_label_killed_half_way_is_finished_by_running_it_again(lab: Lab) -> None:
    """SIGKILL between the pod's own objects and the node's (and, unenrolling, right after the
    removals): the lab's plan still says the old mode, the same command again finishes the job to
    the same end state, and the lab stays one `down` removes (the fixture's)."""
    import os

    sleep = lab.plan.pod("legacy/sleep")
    node_a = lab.plan.node("node-a").netns
    ipset = "istio-inpod-probes-v4" if lab.plan.datapath == "inpod" else "ztunnel-pods-ips"
    for change, point, mode in [("istio.io/dataplane-mode=ambient", "label:pod-added", "ambient"),
                                ("istio.io/dataplane-mode-", "label:removed", "plain")]:
        argv = [*NETLAB, "label", "--lab", lab.name, "namespace/legacy", change]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "NETLAB_TEST_SIGNAL_AT": f"KILL@{point}"})
        assert r.returncode == -9, r.stderr
        assert Lab.attach(lab.name).plan.pod("legacy/sleep").mode != mode  # not recorded: not done
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert Lab.attach(lab.name).plan.pod("legacy/sleep").mode == mode
        assert (sleep.ip in netns_text(node_a, "ipset", "list", ipset)) == (mode == "ambient")
        if lab.plan.datapath == "inpod":
            assert ("legacy/sleep" in zds_pods(lab)) == (mode == "ambient")
            save = netns_text(sleep.netns, "iptables-legacy-save")
            assert save.count("-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT") == (mode == "ambient")
    lab.plan = Lab.attach(lab.name).plan
