"""`netlab capture` end to end (issue 6 acceptance): real labs, the real CLI as a subprocess, and
the pcapng read back by tshark.

* S1 (ambient sleep -> sidecar httpbin): on node-a's ztunnel veth, tshark decodes Geneve with
  VNI 1001 (istioout) carrying sleep's TCP SYN to httpbin's VIP:8000.
* S2 (sidecar sleep -> ambient httpbin): on node-a's uplink, the sidecar's HBONE leg to
  httpbin:15008 shows a TLS handshake.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.lab import Lab

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")]

NETLAB = [sys.executable, "-m", "netlab.cli"]


def netlab(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETLAB, *argv], capture_output=True, text=True, timeout=timeout)


def tshark(path: Path, *args: str) -> list[list[str]]:
    r = subprocess.run(["tshark", "-r", str(path), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


@pytest.fixture
def lab_s1(netlab_run_dir) -> Iterator[Lab]:
    lab = Lab.up("ambient-to-sidecar", name="hc-s1", tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab("hc-s1")


@pytest.fixture
def lab_s2(netlab_run_dir) -> Iterator[Lab]:
    lab = Lab.up("sidecar-to-ambient", name="hc-s2", tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab("hc-s2")


def test_s1_geneve_vni_1001_carries_the_syn_to_the_vip(lab_s1: Lab, tmp_path: Path) -> None:
    zt = lab_s1.plan.pod("ztunnel-node-a")
    node_ns = lab_s1.plan.node("node-a").netns
    svc = lab_s1.plan.services[0]
    f = tmp_path / "s1.pcapng"
    r = netlab("capture", "--lab", "hc-s1", "--iface", f"node-a:{zt.host_veth}", "-w", str(f), "--",
               *NETLAB, "exec", "--lab", "hc-s1", "sleep", "--", "curl", "-s", "--max-time", "5",
               "http://httpbin.bar:8000/headers")
    assert r.returncode == 0, r.stderr
    assert '"Host": "httpbin.bar:8000"' in r.stdout  # CMD's output passes through untouched
    assert f"wrote {f}:" in r.stderr and f"{node_ns}/{zt.host_veth}:" in r.stderr
    rows = tshark(f, "-Y", "geneve && tcp.flags.syn == 1 && tcp.flags.ack == 0", "-T", "fields",
                  "-e", "frame.interface_name", "-e", "geneve.vni", "-e", "ip.dst", "-e", "tcp.dstport",
                  "-e", "frame.packet_flags_direction")
    assert rows, "no Geneve-encapsulated SYN on the ztunnel veth"
    iface, vni, ip_dst, dport, direction = rows[0]
    assert iface == f"{node_ns}/{zt.host_veth}"
    assert int(vni, 0) == 1001
    outer, inner = ip_dst.split(",")[:2]
    assert outer == zt.ip and inner == svc.vip and dport == str(svc.port)
    assert int(direction, 16) == 2  # node-a sends it towards the ztunnel pod


def test_s1_hops_capture_the_contract_interfaces(lab_s1: Lab, tmp_path: Path) -> None:
    """``--hops S1``: the interfaces of S1's hop contract (or, for a path without one, every
    interface on its nodes), so the SYN is seen leaving sleep, on istioout, on pistioout and
    arriving in httpbin's pod."""
    f = tmp_path / "hops.pcapng"
    r = netlab("capture", "--lab", "hc-s1", "--hops", "S1", "-w", str(f), "--",
               *NETLAB, "exec", "--lab", "hc-s1", "sleep", "--", "curl", "-s", "--max-time", "5", "-o", "/dev/null",
               "http://httpbin.bar:8000/headers")
    assert r.returncode == 0, r.stderr
    seen = {row[0] for row in tshark(f, "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0", "-T", "fields",
                                     "-e", "frame.interface_name")}
    p = lab_s1.plan
    for where in (f"{p.pod('sleep').netns}/eth0", f"{p.node('node-a').netns}/istioout",
                  f"{p.pod('ztunnel-node-a').netns}/pistioout", f"{p.pod('httpbin').netns}/eth0"):
        assert where in seen, (where, sorted(seen))


def test_capture_until_interrupted(lab_s1: Lab, tmp_path: Path) -> None:
    f = tmp_path / "int.pcapng"
    p = subprocess.Popen([*NETLAB, "capture", "--lab", "hc-s1", "--iface", "sleep:eth0", "-w", str(f)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        assert "Ctrl-C" in p.stderr.readline()  # printed once every socket is bound
        assert lab_s1.exec_capture("sleep", ["curl", "-s", "--max-time", "5", "-o", "/dev/null",
                                             "http://httpbin.bar:8000/get"]).returncode == 0
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    rows = tshark(f, "-Y", "tcp.dstport == 8000 && tcp.flags.syn == 1", "-T", "fields", "-e", "frame.interface_name")
    assert rows and rows[0][0] == f"{lab_s1.plan.pod('sleep').netns}/eth0"


def test_bad_iface_is_one_line_error(lab_s1: Lab, tmp_path: Path) -> None:
    r = netlab("capture", "--lab", "hc-s1", "--iface", "node-a:nosuch0", "-w", str(tmp_path / "x.pcapng"),
               "--", "true")
    assert r.returncode == 2 and "nosuch0" in r.stderr and "Traceback" not in r.stderr


def test_s2_hbone_to_15008_is_tls(lab_s2: Lab, tmp_path: Path) -> None:
    f = tmp_path / "s2.pcapng"
    httpbin = lab_s2.plan.pod("httpbin")
    r = netlab("capture", "--lab", "hc-s2", "--iface", "node-a:eth0", "-w", str(f), "--",
               *NETLAB, "exec", "--lab", "hc-s2", "sleep", "--", "curl", "-s", "--max-time", "5", "-o", "/dev/null",
               "-w", "%{http_code}", "http://httpbin.bar-1:8000/headers")
    assert r.returncode == 0 and r.stdout == "200", (r.stdout, r.stderr)
    rows = tshark(f, "-d", "tcp.port==15008,tls", "-Y", "tls.handshake.type == 1", "-T", "fields",
                  "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.dstport")
    assert rows, "no TLS ClientHello towards :15008"
    src, dst, dport = rows[0]
    assert (src, dst, dport) == (lab_s2.plan.pod("sleep").ip, httpbin.ip, "15008")
