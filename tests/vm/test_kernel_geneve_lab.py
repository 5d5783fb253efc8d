"""The ambient lab with REAL kernel geneve devices (``tunnel="kernel"``), end to end.

Runs in the VM (scripts/vm-test); the host kernel has no geneve module. One lab,
``ambient-to-ambient`` with ``mesh=False`` (every rule installed, no proxies), and:

* the four tunnel devices are kernel geneve devices with the reference's VNIs and remotes
  (§1.3 node: istioin 1000 / istioout 1001 -> ZT_IP; §2.1 ztunnel: pistioin / pistioout -> HOST_IP);
* the /30s ping across them (192.168.127.1 <-> .2 and 192.168.126.1 <-> .2);
* §8 A step 1-2: a TCP SYN from foo/sleep to bar/httpbin:80 (pod IP, no proxy anywhere) is carried
  by istioout (VNI 1001), decapsulated on pistioout and TPROXYed to a stand-in ``IP_TRANSPARENT``
  listener on 127.0.0.1:15001 in node-a's ztunnel netns, whose accepted socket's local address is
  the original destination and whose peer is sleep's IP.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from netlab.istio import INBOUND_TUN_VNI, OUTBOUND_TUN_VNI
from netlab.netns import in_netns

pytestmark = [pytest.mark.vm, pytest.mark.kernel]

LAB = "vm-a2a"
NODE_TUN = {"istioin": ("192.168.126.1", "192.168.126.2", INBOUND_TUN_VNI),
            "istioout": ("192.168.127.1", "192.168.127.2", OUTBOUND_TUN_VNI)}
ZT_TUN = {"pistioin": INBOUND_TUN_VNI, "pistioout": OUTBOUND_TUN_VNI}


def ns_run(netns: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
    p = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{netns}: {' '.join(argv)} -> {p.returncode}\n{p.stdout}{p.stderr}")
    return p.stdout


def link_details(netns: str, dev: str) -> str:
    return ns_run(netns, "ip", "-d", "link", "show", "dev", dev)


def tx_rx(netns: str, dev: str) -> tuple[int, int]:
    """(tx_packets, rx_packets) from sysfs inside ``netns``."""
    out = ns_run(netns, "cat", f"/sys/class/net/{dev}/statistics/tx_packets", f"/sys/class/net/{dev}/statistics/rx_packets")
    tx, rx = (int(x) for x in out.split())
    return tx, rx


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    from netlab.lab import Lab

    lab = Lab.up("ambient-to-ambient", name=LAB, tunnel="kernel", mesh=False)
    try:
        yield lab
    finally:
        lab.down()


def node_and_ztunnel(lab: Any, node: str) -> tuple[Any, Any]:
    n = next(x for x in lab.plan.nodes if x.name == node)
    zt = next(p for p in lab.plan.pods if p.mode == "ztunnel" and p.node == node)
    return n, zt


def test_plan_is_kernel_mode(lab: Any) -> None:
    assert lab.plan.tunnel == "kernel"
    assert not [p for p in lab.plan.processes if p.kind == "geneve"], "kernel mode runs no userspace encapsulator"


def test_tunnel_devices_are_kernel_geneve(lab: Any) -> None:
    for node in (x.name for x in lab.plan.nodes):
        n, zt = node_and_ztunnel(lab, node)
        for dev, (_local, _peer, vni) in NODE_TUN.items():
            d = link_details(n.netns, dev)
            assert re.search(rf"\bgeneve id {vni} remote {re.escape(zt.ip)}\b", d), f"{node} {dev}:\n{d}"
            assert "tun" not in d.split("\n")[1].split(), f"{dev} must not be a TAP:\n{d}"
            assert "dstport 6081" in d, d
        for dev, vni in ZT_TUN.items():
            d = link_details(zt.netns, dev)
            assert re.search(rf"\bgeneve id {vni} remote {re.escape(n.host_ip)}\b", d), f"{zt.ref} {dev}:\n{d}"
            assert "dstport 6081" in d, d


def test_tunnel_mtu_is_what_the_kernel_derives_in_a_cluster(lab: Any) -> None:
    """KGEN: in a cluster the kernel derives underlay (veth 1500) - 50 = 1450; the lab states that
    value because it creates devices before routes (docs/deviations.md). Same as userspace mode."""
    for node in (x.name for x in lab.plan.nodes):
        n, zt = node_and_ztunnel(lab, node)
        for netns, devs in ((n.netns, NODE_TUN), (zt.netns, ZT_TUN)):
            for dev in devs:
                d = link_details(netns, dev)
                assert re.search(r"\bmtu 1450\b", d), f"{node} {dev}: expected the derived MTU 1450:\n{d}"


def test_ping_over_the_tunnels(lab: Any) -> None:
    for node in (x.name for x in lab.plan.nodes):
        n, zt = node_and_ztunnel(lab, node)
        for dev, (local, peer, _vni) in NODE_TUN.items():
            zdev = "p" + dev
            before = tx_rx(n.netns, dev), tx_rx(zt.netns, zdev)
            ns_run(n.netns, "ping", "-c", "2", "-i", "0.2", "-W", "5", peer)           # node -> ztunnel
            ns_run(zt.netns, "ping", "-c", "2", "-i", "0.2", "-W", "5", local)         # ztunnel -> node
            after = tx_rx(n.netns, dev), tx_rx(zt.netns, zdev)
            # the echo traffic really went through the geneve devices, both ways
            assert after[0][0] - before[0][0] >= 4 and after[0][1] - before[0][1] >= 4, (node, dev, before, after)
            assert after[1][0] - before[1][0] >= 4 and after[1][1] - before[1][1] >= 4, (node, zdev, before, after)


def test_syn_lands_in_transparent_listener_with_original_destination(lab: Any) -> None:
    """§8 A steps 1-2 on kernel geneve: sleep -> httpbin:80 ends at ztunnel-a's 15001 TPROXY listener."""
    from netlab.mesh.sockets import IP_TRANSPARENT

    sleep, httpbin = lab.pod("foo/sleep"), lab.pod("bar/httpbin")
    n, zt = node_and_ztunnel(lab, sleep.node)
    assert httpbin.node != sleep.node
    ready, done = threading.Event(), threading.Event()
    got: dict[str, Any] = {}

    def server() -> None:
        try:
            with in_netns(zt.netns):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                s.bind(("127.0.0.1", 15001))
                s.listen(16)
                s.settimeout(60)
                ready.set()
                conn, peer = s.accept()
                got["local"], got["peer"] = conn.getsockname(), peer
                conn.settimeout(30)
                got["data"] = conn.recv(100)
                conn.sendall(b"pong")
                conn.close()
                s.close()
        except BaseException as e:  # noqa: BLE001
            got["error"] = e
            ready.set()
        finally:
            done.set()

    def client() -> None:
        try:
            with in_netns(sleep.netns):
                c = socket.create_connection((httpbin.ip, 80), timeout=30)
                c.sendall(b"ping")
                got["reply"] = c.recv(100)
                c.close()
        except BaseException as e:  # noqa: BLE001
            got["client_error"] = e

    before = tx_rx(n.netns, "istioout"), tx_rx(zt.netns, "pistioout")
    st = threading.Thread(target=server, daemon=True)
    st.start()
    assert ready.wait(30) and "error" not in got, got.get("error")
    ct = threading.Thread(target=client, daemon=True)
    ct.start()
    assert done.wait(90), "no connection reached the 15001 listener"
    ct.join(30)
    after = tx_rx(n.netns, "istioout"), tx_rx(zt.netns, "pistioout")
    assert "error" not in got, got.get("error")
    assert got["local"] == (httpbin.ip, 80), f"local address is not the original destination: {got}"
    assert got["peer"][0] == sleep.ip, f"peer is not sleep's own IP: {got}"
    assert got["data"] == b"ping", got
    assert "client_error" not in got, f"handshake/reply path failed: {got.get('client_error')}"
    assert got["reply"] == b"pong"
    # the first packet(s) crossed the node's istioout and arrived on the ztunnel's pistioout
    assert after[0][0] > before[0][0], ("istioout tx", before, after)
    assert after[1][1] > before[1][1], ("pistioout rx", before, after)
