"""Kernel geneve <-> userspace encapsulator (netlab.geneve.encap) interoperate on the wire.

    hv-gk: gnv0 (kernel geneve, VNI 1001, remote 10.9.7.2) 192.168.127.1/30
           vk 10.9.7.1/24 ==veth== vu 10.9.7.2/24
    hv-gu: tun0 (persistent TAP, MTU 1450) 192.168.127.2/30 + `python -m netlab.geneve.encap
           --netns hv-gu --tunnel tun0:1001:10.9.7.1`

Both directions of ping, then a TCP transfer each way with a sha256 check. The kernel side only
accepts frames whose VNI and outer source match (geneve_lookup), and the relay only accepts
datagrams from its REMOTE, so success means both ends agree on header, VNI, port and addressing.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.istio import OUTBOUND_TUN_VNI
from netlab.netns import create_netns, delete_netns, in_netns, list_netns

pytestmark = [pytest.mark.vm, pytest.mark.kernel]

NS_K, NS_U = "hv-gk", "hv-gu"
UNDER_K, UNDER_U = "10.9.7.1", "10.9.7.2"
TUN_K, TUN_U = "192.168.127.1", "192.168.127.2"
REPO = Path(__file__).resolve().parents[2]
SIZE = 4 << 20
READY_TIMEOUT = 180  # python start-up + imports under software emulation


def ip(*argv: str) -> None:
    p = subprocess.run(["ip", *argv], capture_output=True, text=True)
    assert p.returncode == 0, f"ip {' '.join(argv)} -> {p.returncode}: {p.stderr.strip()}"


def ns_run(netns: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[str]]:
    if not os.path.exists("/dev/net/tun"):  # a fresh VM: the node appears when tun is loaded
        subprocess.run(["modprobe", "tun"], capture_output=True)
    for ns in (NS_K, NS_U):
        if ns in list_netns():
            delete_netns(ns)
        create_netns(ns)
    relay: subprocess.Popen[str] | None = None
    try:
        ip("link", "add", "vk", "netns", NS_K, "type", "veth", "peer", "name", "vu", "netns", NS_U)
        for ns, dev, addr in ((NS_K, "vk", UNDER_K), (NS_U, "vu", UNDER_U)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        # A veth never computes checksums: with tx offload the outer packet reaches hv-gu with the
        # INNER TCP checksum unfinished (CHECKSUM_PARTIAL), which a real NIC would have filled in.
        # The relay reads bytes from a UDP socket and cannot finish it, so the TAP would drop every
        # kernel->relay TCP segment (ICMP has no offload and works either way). Make the veth
        # behave like a wire.
        sub = subprocess.run(["ip", "netns", "exec", NS_K, "ethtool", "-K", "vk", "tx", "off"],
                             capture_output=True, text=True)
        assert sub.returncode == 0, f"ethtool -K vk tx off: {sub.stderr.strip()} (apt-get install ethtool)"
        # kernel side: created after the underlay route exists, so its MTU is derived (1450)
        ip("-n", NS_K, "link", "add", "gnv0", "type", "geneve", "id", str(OUTBOUND_TUN_VNI), "remote", UNDER_U)
        ip("-n", NS_K, "addr", "add", f"{TUN_K}/30", "dev", "gnv0")
        ip("-n", NS_K, "link", "set", "gnv0", "up")
        # userspace side: a persistent TAP the relay attaches to
        ip("-n", NS_U, "tuntap", "add", "dev", "tun0", "mode", "tap")
        ip("-n", NS_U, "link", "set", "tun0", "mtu", "1450")
        ip("-n", NS_U, "addr", "add", f"{TUN_U}/30", "dev", "tun0")
        ip("-n", NS_U, "link", "set", "tun0", "up")
        log = tmp_path_factory.mktemp("relay") / "relay.log"
        relay = subprocess.Popen(
            [sys.executable, "-m", "netlab.geneve.encap", "--netns", NS_U,
             "--tunnel", f"tun0:{OUTBOUND_TUN_VNI}:{UNDER_K}", "--log", str(log)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert relay.stdout is not None
        if not select.select([relay.stdout], [], [], READY_TIMEOUT)[0]:
            raise AssertionError(f"relay not ready after {READY_TIMEOUT}s")
        line = relay.stdout.readline()
        ready = json.loads(line) if line.startswith("{") else {}
        if ready.get("event") != "ready":
            raise AssertionError(f"relay: {line!r} {relay.stderr.read() if relay.poll() is not None else ''}")
        yield relay
    finally:
        if relay is not None and relay.poll() is None:
            relay.send_signal(signal.SIGTERM)  # our own child, by PID
            try:
                relay.wait(30)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait(10)
        for ns in (NS_K, NS_U):
            if ns in list_netns():
                delete_netns(ns)


def test_kernel_side_is_geneve(pair: subprocess.Popen[str]) -> None:
    d = ns_run(NS_K, "ip", "-d", "link", "show", "gnv0").stdout
    assert f"geneve id {OUTBOUND_TUN_VNI} remote {UNDER_U}" in d, d
    assert "mtu 1450" in d, d
    t = ns_run(NS_U, "ip", "-d", "link", "show", "tun0").stdout
    assert "tun type tap" in t, t


@pytest.mark.parametrize(("src", "dst"), [(NS_K, TUN_U), (NS_U, TUN_K)], ids=["kernel->tap", "tap->kernel"])
def test_ping(pair: subprocess.Popen[str], src: str, dst: str) -> None:
    p = ns_run(src, "ping", "-c", "3", "-i", "0.2", "-W", "5", dst)
    assert p.returncode == 0, p.stdout + p.stderr
    # 1400-byte payload: a full-size inner frame (1428 IP bytes) still fits the 1450 tunnel MTU
    p = ns_run(src, "ping", "-c", "2", "-i", "0.2", "-W", "5", "-M", "do", "-s", "1400", dst)
    assert p.returncode == 0, p.stdout + p.stderr


def transfer(server_ns: str, server_ip: str, client_ns: str) -> None:
    payload = os.urandom(SIZE)
    want = hashlib.sha256(payload).hexdigest()
    ready = threading.Event()
    got: dict[str, object] = {}

    def server() -> None:
        try:
            with in_netns(server_ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((server_ip, 5201))
                s.listen(1)
                s.settimeout(60)
                ready.set()
                c, _ = s.accept()
                c.settimeout(60)
                h, n = hashlib.sha256(), 0
                while chunk := c.recv(1 << 16):
                    h.update(chunk)
                    n += len(chunk)
                got["n"], got["sha"] = n, h.hexdigest()
                c.sendall(got["sha"].encode())  # type: ignore[union-attr]
                c.close()
                s.close()
        except BaseException as e:  # noqa: BLE001
            got["error"] = e
            ready.set()

    t = threading.Thread(target=server, daemon=True)
    t.start()
    assert ready.wait(30) and "error" not in got, got.get("error")
    with in_netns(client_ns):
        c = socket.create_connection((server_ip, 5201), timeout=60)
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    echoed = b""
    while chunk := c.recv(128):
        echoed += chunk
    c.close()
    t.join(60)
    assert "error" not in got, got.get("error")
    assert got["n"] == SIZE, got
    assert got["sha"] == want
    assert echoed.decode() == want


def test_tcp_kernel_to_tap(pair: subprocess.Popen[str]) -> None:
    transfer(server_ns=NS_U, server_ip=TUN_U, client_ns=NS_K)


def test_tcp_tap_to_kernel(pair: subprocess.Popen[str]) -> None:
    transfer(server_ns=NS_K, server_ip=TUN_K, client_ns=NS_U)
