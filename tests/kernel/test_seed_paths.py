"""The seed article's three paths, end to end in real namespaces with every proxy running.

* S1 ambient sleep -> sidecar httpbin: ztunnel-node-a 15001 -> plain TCP -> httpbin's sidecar
  15006 -> httpbin sees 127.0.0.6.
* S2 sidecar sleep -> ambient httpbin: sleep's sidecar originates HBONE to httpbin's *pod IP*:15008;
  node-b routes it into istioin -> pistioin -> ztunnel-node-b:15008 (proved by a capture on
  istioin and ztunnel-node-b's connection log); httpbin sees sleep's pod IP.
* S3 sidecar sleep -> helloworld with a waypoint: sidecar -> HBONE to the waypoint (node-c) ->
  new HBONE to helloworld:15008 (node-d); helloworld sees the waypoint's pod IP.

Evidence is what the apps and the kernel saw (HTTP bodies, SYNs captured with tshark) plus the
proxies' per-leg connection logs joined by 4-tuple.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from netlab.lab import Lab
from netlab.mesh.connlog import read_legs

pytestmark = pytest.mark.kernel


# ---- helpers --------------------------------------------------------------------------------------
def curl(lab: Lab, pod: str, url: str) -> tuple[int, str]:
    r = lab.exec_capture(pod, ["curl", "-s", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", url], timeout=15)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def legs(lab: Lab, component: str, n: int = 1, timeout: float = 5.0) -> list[dict]:
    """Connection-log lines of a component (written when a connection ends, just after curl returns)."""
    path = lab.state_dir / "conn" / f"{component}.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        got = read_legs(path)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@dataclass(frozen=True)
class Pkt:
    t: float
    src: str
    sport: int
    dst: str
    dport: int
    syn: bool
    ack: bool


@contextmanager
def capture(netns: str, iface: str, bpf: str) -> Iterator[list[Pkt]]:
    """tshark on ``iface`` inside ``netns``; the yielded list is filled when the block exits."""
    out: list[Pkt] = []
    p = subprocess.Popen(
        ["ip", "netns", "exec", netns, "tshark", "-l", "-n", "-i", iface, "-f", bpf, "-T", "fields",
         "-E", "separator=,", "-e", "frame.time_epoch", "-e", "ip.src", "-e", "tcp.srcport", "-e", "ip.dst",
         "-e", "tcp.dstport", "-e", "tcp.flags.syn", "-e", "tcp.flags.ack"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = threading.Event()
    err: list[str] = []

    def watch() -> None:
        assert p.stderr is not None
        for line in p.stderr:
            err.append(line)
            if "Capture started" in line:  # dumpcap really listens (``Capturing on`` comes earlier)
                started.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert started.wait(20), f"tshark did not start: {''.join(err)}"
        yield out
        time.sleep(0.3)  # let the last packets reach tshark
    finally:
        p.send_signal(signal.SIGINT)  # our own tshark (ip netns exec execs it: same PID)
        try:
            stdout, _ = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
    for line in stdout.splitlines():
        f = line.split(",")
        if len(f) == 7 and f[1]:
            flag = lambda v: v in ("1", "True")  # noqa: E731 - tshark prints 1/0 or True/False by version
            out.append(Pkt(float(f[0]), f[1], int(f[2]), f[3], int(f[4]), flag(f[5]), flag(f[6])))


def syns(pkts: list[Pkt]) -> list[Pkt]:
    return [p for p in pkts if p.syn and not p.ack]


@contextmanager
def lab_up(topology: str, name: str) -> Iterator[Lab]:
    lab = Lab.up(topology, name=name, tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab(name)


def node_netns(lab: Lab, node: str) -> str:
    return lab.plan.node(node).netns


# ---- S1 -------------------------------------------------------------------------------------------
def test_s1_ambient_sleep_to_sidecar_httpbin() -> None:
    with lab_up("ambient-to-sidecar", "hs-s1") as lab:
        sleep, httpbin = lab.plan.pod("foo/sleep"), lab.plan.pod("bar/httpbin")
        code, body = curl(lab, "foo/sleep", "http://httpbin.bar:8000/headers")
        assert code == 200 and json.loads(body)["headers"]["Host"] == "httpbin.bar:8000"
        code, body = curl(lab, "foo/sleep", "http://httpbin.bar:8000/ip")
        assert code == 200 and json.loads(body)["origin"] == "127.0.0.6"
        zt = [x for x in legs(lab, "ztunnel-node-a", 2) if x["listener"] == "outbound:15001"]
        sc = [x for x in legs(lab, "httpbin.bar-sidecar", 2) if x["listener"] == "inbound:15006"]
        assert len(zt) == 2 and len(sc) == 2
        for z, s in zip(zt, sc, strict=True):
            assert z["src"].startswith(sleep.ip + ":") and z["proto"] == "tcp"  # httpbin has no tunnel
            assert s["src"] == z["up_src"] and s["orig_dst"] == z["up_dst"] == f"{httpbin.ip}:80"
            assert s["up_src"].startswith("127.0.0.6:")


# ---- S2 + S3 --------------------------------------------------------------------------------------
def test_s2_sidecar_sleep_to_ambient_httpbin_enters_istioin() -> None:
    with lab_up("sidecar-to-ambient", "hs-s2") as lab:
        sleep, httpbin = lab.plan.pod("foo/sleep"), lab.plan.pod("bar-1/httpbin")
        with capture(node_netns(lab, "node-b"), "istioin", "tcp port 15008") as pkts:
            code, body = curl(lab, "foo/sleep", "http://httpbin.bar-1:8000/ip")
        assert code == 200, body
        assert json.loads(body)["origin"] == sleep.ip  # ztunnel-node-b spoofed sleep's IP toward httpbin

        (out,) = legs(lab, "sleep.foo-sidecar")
        assert out["proto"] == "hbone" and out["up_dst"] == f"{httpbin.ip}:15008"  # pod IP, not ztunnel's
        assert out["authority"] == f"{httpbin.ip}:80" and out["dst_id"].endswith("/ns/bar-1/sa/httpbin")
        inb = [x for x in legs(lab, "ztunnel-node-b") if x["listener"] == "inbound:15008"]
        assert len(inb) == 1 and inb[0]["src"] == out["up_src"] and inb[0]["src_id"].endswith("/ns/foo/sa/sleep")
        assert inb[0]["authority"] == out["authority"]

        up_ip, up_port = out["up_src"].rsplit(":", 1)
        syn = [p for p in syns(pkts) if (p.src, p.sport, p.dst, p.dport) == (up_ip, int(up_port), httpbin.ip, 15008)]
        assert syn, f"no SYN {out['up_src']} -> {httpbin.ip}:15008 on node-b istioin: {pkts}"


def test_s3_sidecar_sleep_to_helloworld_via_waypoint() -> None:
    with lab_up("sidecar-to-ambient", "hs-s3") as lab:
        wp, hello = lab.plan.pod("bar-2/waypoint"), lab.plan.pod("bar-2/helloworld")
        assert wp.node == "node-c" and hello.node == "node-d"
        with capture(hello.netns, "eth0", "tcp dst port 5000") as at_app, \
                capture(node_netns(lab, "node-c"), "eth0", f"tcp dst port 15008 and host {wp.ip}") as at_c:
            code, body = curl(lab, "foo/sleep", "http://helloworld.bar-2:5000/hello")
        assert code == 200 and body.startswith("Hello version: v1"), body

        # what helloworld's socket accepted: the SYN came from the waypoint pod IP
        app_syns = syns(at_app)
        assert app_syns and all(p.src == wp.ip for p in app_syns), app_syns

        (sc,) = legs(lab, "sleep.foo-sidecar")
        (w,) = legs(lab, "waypoint.bar-2")
        zd = [x for x in legs(lab, "ztunnel-node-d") if x["listener"] == "inbound:15008"]
        assert sc["up_dst"] == f"{wp.ip}:15008" and sc["authority"] == f"{hello.ip}:5000"
        assert w["src"] == sc["up_src"] and w["up_dst"] == f"{hello.ip}:15008"
        assert w["src_id"].endswith("/ns/foo/sa/sleep") and w["dst_id"].endswith("/ns/bar-2/sa/helloworld")
        assert len(zd) == 1 and zd[0]["src"] == w["up_src"]  # 4-tuple join waypoint -> node-d
        assert zd[0]["src"].startswith(wp.ip + ":") and zd[0]["src_id"].endswith("/sa/waypoint-istio-waypoint")
        assert zd[0]["up_src"].startswith(wp.ip + ":")  # ztunnel-node-d connected to helloworld as the waypoint
        # node-c saw it before node-d: waypoint leg starts first, and node-c's uplink saw the SYN first
        assert w["start"] < zd[0]["start"]
        c_syn = [p for p in syns(at_c) if p.dst == wp.ip]
        assert c_syn and c_syn[0].t < app_syns[0].t


# ---- two labs at once -----------------------------------------------------------------------------
def test_two_labs_side_by_side() -> None:
    with lab_up("ambient-to-sidecar", "hs-x1") as a, lab_up("ambient-to-sidecar", "hs-x2") as b:
        for lab in (a, b, a):
            code, body = curl(lab, "foo/sleep", "http://httpbin.bar:8000/ip")
            assert code == 200 and json.loads(body)["origin"] == "127.0.0.6"
        assert len(legs(a, "httpbin.bar-sidecar", 2)) == 2 and len(legs(b, "httpbin.bar-sidecar")) == 1
