"""Kubelet probes from each node's kubelet stand-in (issue 20), on both datapaths
(topologies/kubelet-probes: a plain, a sidecar and an ambient httpbin on node-b, each with a
readiness and a liveness probe; the ambient one behind an ALLOW policy for ns/foo only).

* every probed pod becomes ready and stays live; ``netlab trace --probe`` of each matches the
  release's probe contract (1.18: straight out of the pod's veth; inpod: SNATed to 169.254.7.127
  and ACCEPTed by the pod's nat ISTIO_PRERT #1);
* the probe exemption taken away on purpose (1.18: node-b's mangle ztunnel-OUTPUT #1; inpod: the
  ambient pod's nat ISTIO_PRERT #1): the probe goes through ztunnel, which has no identity for it,
  so the policy denies it; the ambient pod turns unready (the others do not), and
  ``trace --probe`` exits 1 naming the hop (1.18: hop (1), istioin instead of the veth; inpod:
  hop (2), ISTIO_PRERT #2 instead of #1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from netlab.lab import Lab
from tests.labs import DATAPATHS, up_for_datapath

pytestmark = pytest.mark.kernel

NETLAB = [sys.executable, "-m", "netlab.cli"]
PROBED = ("legacy/httpbin", "bar-sc/httpbin", "bar-amb/httpbin")


@pytest.fixture(scope="module", params=DATAPATHS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    yield from up_for_datapath("kubelet-probes", request.param, ("h20k", "h20ki"))


def pods(lab: Lab) -> dict[str, dict[str, Any]]:
    st = json.loads(subprocess.run([*NETLAB, "status", lab.name, "--json"], capture_output=True, text=True,
                                   check=True).stdout)
    return {f"{p['namespace']}/{p['name']}": p for p in st["pods"]}


def wait_for(lab: Lab, ready: dict[str, bool], within: float = 10.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        got = pods(lab)
        if all(got[ref].get("ready") is want for ref, want in ready.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def trace_probe(lab: Lab, pod: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, "trace", "--lab", lab.name, "--probe", pod], capture_output=True, text=True,
                          timeout=60)


def test_probes_pass_then_fail_without_the_exemption(lab: Lab) -> None:
    inpod = lab.plan.datapath == "inpod"
    got = wait_for(lab, dict.fromkeys(PROBED, True))
    for ref in PROBED:
        assert got[ref]["ready"] is True and got[ref]["live"] is True, got[ref]
        assert {p["kind"] for p in got[ref]["probes"]} == {"readiness", "liveness"}
    assert got["foo/sleep"]["ready"] is True and "probes" not in got["foo/sleep"]  # no probe: its processes run
    kubelet_pid = next(p["pid"] for p in lab.health()["processes"] if p["name"] == "kubelet-node-b")
    for ref in PROBED:
        r = trace_probe(lab, ref)
        assert r.returncode == 0 and "MATCH" in r.stdout, r.stdout + r.stderr
    amb = lab.plan.pod("bar-amb/httpbin")
    r = trace_probe(lab, "bar-amb/httpbin")
    # the source the ambient pod sees: the node's SNAT address under inpod, HOST_IP in 1.18
    src = "169.254.7.127" if inpod else lab.plan.node("node-b").host_ip
    assert f"(2) pod:bar-amb/httpbin        eth0               in   {src}:" in r.stdout, r.stdout
    # ---- take the exemption away ----
    if inpod:
        cmd = ["ip", "netns", "exec", amb.netns, "iptables-legacy", "-t", "nat", "-D", "ISTIO_PRERT",
               "-s", "169.254.7.127/32", "-p", "tcp", "-m", "tcp", "-j", "ACCEPT"]
    else:
        node = lab.plan.node("node-b")
        cmd = ["ip", "netns", "exec", node.netns, "iptables-legacy", "-t", "mangle", "-D", "ztunnel-OUTPUT",
               "-s", f"{node.host_ip}/32", "-j", "MARK", "--set-xmark", "0x220/0xffffffff"]
    subprocess.run(cmd, check=True)
    got = wait_for(lab, {"bar-amb/httpbin": False})
    assert got["bar-amb/httpbin"]["ready"] is False and got["bar-amb/httpbin"]["live"] is False, got["bar-amb/httpbin"]
    assert got["legacy/httpbin"]["ready"] is True and got["bar-sc/httpbin"]["ready"] is True
    last = next(p["last"] for p in got["bar-amb/httpbin"]["probes"] if p["kind"] == "readiness")
    assert not last["ok"] and "reset" in last["result"].lower(), last
    r = trace_probe(lab, "bar-amb/httpbin")
    assert r.returncode == 1, r.stdout + r.stderr
    verdict = next(ln for ln in r.stdout.splitlines() if ln.startswith("contract "))
    if inpod:
        assert "hop (2) diverged" in verdict and "§1.4 nat ISTIO_PRERT #2" in verdict, verdict
    else:
        assert "hop (1) diverged" in verdict and "istioin" in verdict, verdict
    assert "DENIED by policy only-foo" in r.stdout
    assert next(p["pid"] for p in lab.health()["processes"] if p["name"] == "kubelet-node-b") == kubelet_pid


def test_trace_probe_bad_input(lab: Lab) -> None:
    for argv, words in [(["--probe", "foo/sleep"], "declares no readiness probe"),
                        (["--probe", "bar-amb/httpbin", "--from", "foo/sleep"], "leave out --from"),
                        ([], "--probe POD")]:
        r = subprocess.run([*NETLAB, "trace", "--lab", lab.name, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
