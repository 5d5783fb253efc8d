"""Ambient -> HBONE-capable sidecar under Istio 1.18 (issue 20; istio/istio#56916).

httpbin's pod carries ``networking.istio.io/tunnel: http`` (topologies/ambient-to-hbone-sidecar):
ztunnel sends HBONE to the sidecar's own 15008, httpbin's ISTIO_INBOUND returns 15008
unredirected, and the sidecar's HBONE listener terminates it. The request answers 200, a capture
in httpbin's pod shows a TLS ClientHello from sleep's (spoofed) IP to httpbin:15008, the legs say
who carried it, and the trace matches the topology's contract. Without the label (S1) the same
request is plain TCP to 15006: the contrast is checked too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.lab import Lab
from netlab.verify.trace import trace

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")]

NETLAB = [sys.executable, "-m", "netlab.cli"]
LAB = "h20hb"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up("ambient-to-hbone-sidecar", name=LAB)
    try:
        yield lab
    finally:
        lab.down()


def test_ambient_to_hbone_sidecar_is_tls_on_15008_and_answers_200(lab: Lab, tmp_path: Path) -> None:
    f = tmp_path / "hb.pcapng"
    sleep, httpbin = lab.plan.pod("foo/sleep"), lab.plan.pod("bar/httpbin")
    assert dict(httpbin.labels)["networking.istio.io/tunnel"] == "http"
    n = len(lab.connection_legs("httpbin.bar-sidecar"))
    r = subprocess.run([*NETLAB, "capture", "--lab", LAB, "--iface", "bar/httpbin:eth0", "-w", str(f), "--",
                        *NETLAB, "exec", "--lab", LAB, "sleep", "--", "curl", "-s", "--max-time", "5",
                        "http://httpbin.bar:8000/ip"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["origin"] == "127.0.0.6", (r.stdout, r.stderr)
    t = subprocess.run(["tshark", "-r", str(f), "-d", "tcp.port==15008,tls", "-Y", "tls.handshake.type == 1",
                        "-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.dstport"],
                       capture_output=True, text=True, timeout=60)
    rows = [ln.split("\t") for ln in t.stdout.splitlines()]
    assert rows and rows[0] == [sleep.ip, httpbin.ip, "15008"], (rows, t.stderr)
    zt = [g for g in lab.connection_legs("ztunnel-node-a") if g.src.startswith(f"{sleep.ip}:")]
    assert zt[-1].proto == "hbone" and zt[-1].up_dst == f"{httpbin.ip}:15008", zt[-1]
    legs = lab.connection_legs("httpbin.bar-sidecar")[n:]
    assert [g.listener for g in legs] == ["inbound:15008"], legs
    assert legs[0].src_id == "spiffe://cluster.local/ns/foo/sa/sleep" and legs[0].up_src.startswith("127.0.0.6:")
    res = trace(lab, "foo/sleep", "httpbin.bar:8000", "/headers")
    assert res.contract is not None and res.contract.name == "ambient-to-hbone-sidecar"
    assert res.matched, res.render()


def test_iptables_return_15008_and_the_sidecar_listens_there(lab: Lab) -> None:
    httpbin = lab.plan.pod("bar/httpbin")
    save = subprocess.run(["ip", "netns", "exec", httpbin.netns, "iptables-legacy-save", "-t", "nat"],
                          capture_output=True, text=True, check=True).stdout
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN" in save.splitlines()
    ss = subprocess.run(["ip", "netns", "exec", httpbin.netns, "ss", "-ltnH"], capture_output=True, text=True).stdout
    assert any(ln.split()[3].endswith(":15008") for ln in ss.splitlines() if ln.strip())
