"""Userspace Geneve over TAP between two namespaces, checked on the wire.

Topology (all lab-private; nothing touches the root namespace)::

    hg-a: tun0 192.168.127.1/30 (TAP) -- relay --  va 10.9.0.1/24 ==veth== vb 10.9.0.2/24 -- relay -- tun0 192.168.127.2/30 :hg-b

Both relays use VNI 1001 (istioout) and name each other as remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scapy.arch.linux import L2ListenSocket
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import wrpcap

from netlab.istio import GENEVE_DST_PORT, INBOUND_TUN_VNI, OUTBOUND_TUN_VNI
from netlab.netns import assert_socket_in, create_netns, current_cookie, delete_netns, in_netns, list_netns

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

NS_A, NS_B = "hg-a", "hg-b"
UNDER_A, UNDER_B, UNDER_A2 = "10.9.0.1", "10.9.0.2", "10.9.0.3"
TUN_A, TUN_B = "192.168.127.1", "192.168.127.2"
MAC_A, MAC_B = "02:00:00:00:a0:01", "02:00:00:00:b0:01"
TAP = "tun0"
TAP_MTU = 1500 - 50  # what a kernel geneve device derives from a 1500-byte underlay
PY = sys.executable


# ---------------------------------------------------------------- namespace plumbing

def iproute(ns: str):  # noqa: ANN201 - pyroute2 IPRoute
    """A pyroute2 socket opened inside ``ns`` (calling thread must be in ``ns``), cookie-checked."""
    from pyroute2 import IPRoute

    ipr = IPRoute()
    assert_socket_in(ipr.fileno(), current_cookie(), f"netlink socket for {ns}")
    return ipr


def build_side(ns: str, under_ip: str, tun_ip: str, mac: str) -> None:
    with in_netns(ns), iproute(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname=TAP, kind="tuntap", mode="tap")
        tap = ipr.link_lookup(ifname=TAP)[0]
        ipr.link("set", index=tap, address=mac, mtu=TAP_MTU, state="up")
        ipr.addr("add", index=tap, address=tun_ip, prefixlen=30)
        dev = ipr.link_lookup(ifname="va" if ns == NS_A else "vb")[0]
        ipr.addr("add", index=dev, address=under_ip, prefixlen=24)
        ipr.link("set", index=dev, state="up")


def in_thread(ns: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a fresh thread inside ``ns`` and return its result (re-raising errors)."""
    out: list[object] = []

    def body() -> None:
        try:
            with in_netns(ns):
                out.append(fn())
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@dataclass
class Sniffer:
    """scapy AF_PACKET capture opened inside ``ns`` from a worker thread (in_netns)."""

    ns: str
    iface: str
    packets: list[Packet] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._err: BaseException | None = None
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        assert self._ready.wait(5), "sniffer did not start"
        if self._err:
            raise self._err

    def _run(self) -> None:
        try:
            with in_netns(self.ns):
                sock = L2ListenSocket(iface=self.iface, promisc=False)
                assert_socket_in(sock.ins, current_cookie(), f"sniffer {self.ns}/{self.iface}")
        except BaseException as e:  # noqa: BLE001
            self._err = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if select.select([sock.ins], [], [], 0.05)[0]:
                    p = sock.recv()
                    if p is not None:
                        self.packets.append(p)
        finally:
            sock.close()

    def stop(self, settle: float = 0.3) -> list[Packet]:
        time.sleep(settle)
        self._stop.set()
        self._t.join(5)
        return self.packets


# ---------------------------------------------------------------- relay processes

@dataclass
class Relay:
    ns: str
    proc: subprocess.Popen
    log: Path
    ready: dict

    @classmethod
    def start(cls, ns: str, tunnels: list[str], log: Path | None = None) -> Relay:
        argv = [PY, "-m", "netlab.geneve.encap", "--netns", ns]
        for t in tunnels:
            argv += ["--tunnel", t]
        if log:
            argv += ["--log", str(log)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[2])
        line = read_line(proc, 10)
        ready = json.loads(line) if line else {}
        if ready.get("event") != "ready":
            proc.kill()
            raise AssertionError(f"relay in {ns} not ready: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}")
        return cls(ns, proc, log or Path("/dev/null"), ready)

    def counters(self) -> dict:
        """SIGUSR1, then the newest counters line from the log."""
        before = self.log.read_text().count("\n")
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.time() + 5
        while time.time() < deadline:
            lines = self.log.read_text().splitlines()
            if len(lines) > before:
                return json.loads(lines[-1])
            time.sleep(0.02)
        raise AssertionError("no counters line after SIGUSR1")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # by PID, our own child
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    if select.select([proc.stdout], [], [], timeout)[0]:
        return proc.stdout.readline()
    return ""


@dataclass
class Lab:
    a: Relay
    b: Relay
    tmp: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("geneve")
    relays: list[Relay] = []
    for ns in (NS_A, NS_B):
        delete_netns(ns)  # leftovers of an interrupted run
        create_netns(ns)
    try:
        with in_netns(NS_A), iproute(NS_A) as ipr:
            ipr.link("add", ifname="va", kind="veth", peer={"ifname": "vb", "net_ns_fd": NS_B})
        build_side(NS_A, UNDER_A, TUN_A, MAC_A)
        build_side(NS_B, UNDER_B, TUN_B, MAC_B)
        relays.append(Relay.start(NS_A, [f"{TAP}:{OUTBOUND_TUN_VNI}:{UNDER_B}"], tmp / "a.log"))
        relays.append(Relay.start(NS_B, [f"{TAP}:{OUTBOUND_TUN_VNI}:{UNDER_A}"], tmp / "b.log"))
        yield Lab(relays[0], relays[1], tmp)
    finally:
        codes = [r.stop() for r in relays]
        for ns in (NS_A, NS_B):
            delete_netns(ns)
    assert codes == [0] * len(relays), f"relays did not exit cleanly on SIGTERM: {codes}"


def ping(ns: str, dst: str, count: int = 5, interval: float = 0.2, timeout: float = 2.0) -> tuple[int, float]:
    """(replies received, average RTT in ms) for ICMP echo from a raw socket opened inside ``ns``.

    The machine has no iputils ping; a raw ICMP socket (root) avoids ping_group_range.
    """
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident, rtts = os.getpid() & 0xFFFF, []
    with s:
        for seq in range(count):
            echo = bytes(ICMP(type=8, id=ident, seq=seq) / b"hg-ping-payload-0123456789")  # built before t0
            t0 = time.perf_counter()
            s.sendto(echo, (dst, 0))
            deadline = t0 + timeout
            while (left := deadline - time.perf_counter()) > 0:
                if not select.select([s], [], [], left)[0]:
                    break
                data, addr = s.recvfrom(65535)
                t1 = time.perf_counter()
                off = (data[0] & 0x0F) * 4  # raw ICMP sockets deliver the IP header
                if addr[0] == dst and data[off] == 0 and struct.unpack_from("!HH", data, off + 4) == (ident, seq):
                    rtts.append((t1 - t0) * 1000)
                    break
            time.sleep(interval)
    return len(rtts), (sum(rtts) / len(rtts) if rtts else float("nan"))


# ---------------------------------------------------------------- tests

def test_ready_line_describes_the_tap(lab: Lab) -> None:
    (t,) = lab.a.ready["tunnels"]
    assert (t["dev"], t["vni"], t["remote"], t["mac"], t["mtu"]) == (TAP, OUTBOUND_TUN_VNI, UNDER_B, MAC_A, TAP_MTU)
    assert lab.a.ready["port"] == GENEVE_DST_PORT and lab.a.ready["pid"] == lab.a.proc.pid


def test_ping_over_tunnel(lab: Lab) -> None:
    received, rtt = ping(NS_A, TUN_B, count=5)
    assert received == 5, "ping over the userspace geneve /30 failed"
    print(f"\nping {TUN_A} -> {TUN_B} over userspace geneve: avg rtt {rtt:.3f} ms")


def test_wire_format_on_the_veth(lab: Lab) -> None:
    sniff = Sniffer(NS_B, "vb")
    assert ping(NS_A, TUN_B, count=3, interval=0.1)[0] == 3
    for tos in (0xB9, 0xBB):  # DSCP EF + ECT(1), then + CE: the outer copies ECN only, CE -> ECT(0)
        _udp_over_tunnel(tos, b"hg-tos-%02x" % tos)
    pkts = [p for p in sniff.stop() if UDP in p and p[UDP].dport == GENEVE_DST_PORT]

    requests = [p for p in pkts if p[IP].dst == UNDER_B and ICMP in p and p[ICMP].type == 8]
    assert len(requests) >= 3, f"no geneve-carried echo requests seen on vb ({len(pkts)} geneve packets)"
    for p in requests:
        outer, udp, g = p[IP], p[UDP], p[GENEVE]
        assert (outer.src, outer.dst) == (UNDER_A, UNDER_B)  # outer dst = remote, src by routing
        assert outer.ttl == 64 and not outer.flags.DF and outer.tos == 0  # ip_default_ttl, GENEVE_DF_UNSET
        assert udp.chksum == 0 and udp.len == 16 + len(g.payload)  # IPv4 geneve: no UDP checksum
        assert (g.version, g.optionlen, g.oam, g.critical, g.proto, g.vni) == (0, 0, 0, 0, 0x6558, OUTBOUND_TUN_VNI)
        inner = g[Ether]
        assert (inner.src, inner.dst) == (MAC_A, MAC_B)
        assert (g[IP].src, g[IP].dst) == (TUN_A, TUN_B)
    assert len({p[UDP].sport for p in requests}) == 1, "one inner flow must keep one UDP source port"
    assert len({p[IP].id for p in requests}) == len(requests), "outer IP ID comes from __ip_select_ident"
    outer_tos = {bytes(p[GENEVE].payload)[-9:]: p[IP].tos for p in pkts
                 if p[IP].dst == UNDER_B and bytes(p[GENEVE].payload).endswith((b"hg-tos-b9", b"hg-tos-bb"))}
    assert outer_tos == {b"hg-tos-b9": 0x01, b"hg-tos-bb": 0x02}
    assert any(p[IP].dst == UNDER_A and ICMP in p and p[ICMP].type == 0 for p in pkts), "no echo reply over geneve"

    pcap = lab.tmp / "vb.pcap"
    wrpcap(str(pcap), pkts)
    r = subprocess.run(["tshark", "-r", str(pcap), "-Y", f"geneve.vni == {OUTBOUND_TUN_VNI} && icmp",
                        "-T", "fields", "-e", "geneve.vni", "-e", "ip.dst", "-e", "geneve.proto_type"],
                       capture_output=True, text=True, timeout=60)
    rows = [line.split("\t") for line in r.stdout.splitlines() if line.strip()]
    assert rows, f"tshark decoded no geneve vni {OUTBOUND_TUN_VNI}: {r.stderr}"
    assert all(int(row[0], 0) == OUTBOUND_TUN_VNI and int(row[2], 0) == 0x6558 for row in rows)  # printed as hex
    assert any(row[1].split(",")[0] == UNDER_B for row in rows)  # outer ip.dst listed first


def _udp_over_tunnel(tos: int, payload: bytes) -> None:
    """One UDP datagram hg-a -> hg-b through the tunnel with the given inner TOS byte."""
    with in_netns(NS_A):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        s.sendto(payload, (TUN_B, 9))


def _inject(src_ip: str, vni: int, marker: bytes) -> None:
    """Send one hand-made Geneve datagram from ``src_ip`` (hg-a) to hg-b's relay."""
    inner = Ether(src=MAC_A, dst=MAC_B) / IP(src=TUN_A, dst=TUN_B) / UDP(sport=4242, dport=9) / marker
    hdr = bytes(GENEVE(vni=vni, proto=0x6558))

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((src_ip, 0))
            s.sendto(hdr + bytes(inner), (UNDER_B, GENEVE_DST_PORT))

    in_thread(NS_A, send)


def test_receive_filter_source_and_vni(lab: Lab) -> None:
    with in_netns(NS_A), iproute(NS_A) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="va")[0], address=UNDER_A2, prefixlen=24)
    try:
        before = lab.b.counters()
        sniff = Sniffer(NS_B, TAP)
        _inject(UNDER_A2, OUTBOUND_TUN_VNI, b"hg-wrong-source")  # right VNI, wrong outer source
        _inject(UNDER_A, INBOUND_TUN_VNI, b"hg-wrong-vni")  # right source, VNI of no device here
        _inject(UNDER_A, OUTBOUND_TUN_VNI, b"hg-control")  # both right: must arrive
        seen = b"".join(bytes(p) for p in sniff.stop(0.5))
        after = lab.b.counters()
    finally:
        with in_netns(NS_A), iproute(NS_A) as ipr:
            ipr.addr("del", index=ipr.link_lookup(ifname="va")[0], address=UNDER_A2, prefixlen=24)
    assert b"hg-control" in seen, "control datagram not delivered to tun0: sniffer or relay broken"
    assert b"hg-wrong-source" not in seen
    assert b"hg-wrong-vni" not in seen
    assert after["dropped_wrong_source"] - before["dropped_wrong_source"] == 1
    assert after["dropped_wrong_vni"] - before["dropped_wrong_vni"] == 1
    assert after["rx"] > before["rx"]


def _transfer(nbytes: int, dst: str = TUN_B) -> tuple[str, str, float]:
    """TCP hg-a -> hg-b to ``dst`` (tunnel address by default): (sha256 sent, sha256 received, seconds)."""
    payload = os.urandom(nbytes)
    result: dict[str, object] = {}
    ready = threading.Event()

    def server() -> None:
        with in_netns(NS_B):
            srv = socket.create_server((dst, 5001))
        with srv:
            ready.set()
            srv.settimeout(20)
            conn, _ = srv.accept()
            with conn:
                h = hashlib.sha256()
                n = 0
                while chunk := conn.recv(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
                result["sha"], result["n"] = h.hexdigest(), n

    t = threading.Thread(target=server)
    t.start()
    assert ready.wait(5)
    with in_netns(NS_A):
        cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with cli:
        cli.settimeout(30)
        start = time.perf_counter()
        cli.connect((dst, 5001))
        cli.sendall(payload)
        cli.shutdown(socket.SHUT_WR)
        t.join(60)
        elapsed = time.perf_counter() - start
    assert result.get("n") == nbytes, f"received {result.get('n')} of {nbytes} bytes"
    return hashlib.sha256(payload).hexdigest(), str(result["sha"]), elapsed


def test_tcp_transfer_intact(lab: Lab) -> None:
    sent, got, _ = _transfer(4 << 20)
    assert sent == got


def test_throughput_and_rtt(lab: Lab) -> None:
    """Not a pass/fail benchmark: prints numbers for the report (run with -s)."""
    before = lab.a.counters()
    size = 32 << 20
    sent, got, secs = _transfer(size)
    assert sent == got
    after = lab.a.counters()
    _, _, secs_veth = _transfer(size, dst=UNDER_B)
    _, rtt = ping(NS_A, TUN_B, count=20, interval=0.05)
    _, rtt_veth = ping(NS_A, UNDER_B, count=20, interval=0.05)
    frames = after["tx"] - before["tx"]
    print(f"\nTCP {size >> 20} MiB over userspace geneve: {secs:.2f} s = {size * 8 / secs / 1e6:.0f} Mbit/s, "
          f"{frames} frames a->b ({frames / secs:.0f} pps) [plain veth: {size * 8 / secs_veth / 1e6:.0f} Mbit/s]; ping rtt tunnel {rtt:.3f} ms vs plain veth {rtt_veth:.3f} ms; "
          f"tx_errors a={after['tx_errors']}")
    assert secs < 60


def test_cli_counters_to_stdout_and_clean_exit(tmp_path: Path) -> None:
    """Own netns: SIGUSR1 without --log goes to stdout; SIGTERM exits 0 with a final line;
    a missing TAP is an error, not a silently created device."""
    ns = "hg-c"
    delete_netns(ns)
    create_netns(ns)
    procs: list[subprocess.Popen] = []
    try:
        with in_netns(ns), iproute(ns) as ipr:
            ipr.link("add", ifname="pistioout", kind="tuntap", mode="tap")
            ipr.link("add", ifname="pistioin", kind="tuntap", mode="tap")
        r = Relay.start(ns, [f"pistioout:{OUTBOUND_TUN_VNI}:10.9.9.9", f"pistioin:{INBOUND_TUN_VNI}:10.9.9.9"])
        procs.append(r.proc)
        assert [t["dev"] for t in r.ready["tunnels"]] == ["pistioout", "pistioin"]
        os.kill(r.proc.pid, signal.SIGUSR1)
        c = json.loads(read_line(r.proc, 5))
        assert c["event"] == "counters" and c["rx"] == 0 and set(c["tunnels"]) == {"pistioout", "pistioin"}
        assert r.stop() == 0
        assert json.loads(r.proc.stdout.readline())["event"] == "exit"

        bad = subprocess.run([PY, "-m", "netlab.geneve.encap", "--netns", ns, "--tunnel", "nosuch:1:10.9.9.9"],
                             capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
        assert bad.returncode == 1 and "does not exist" in bad.stdout

        def links() -> list[str]:
            with iproute(ns) as ipr:
                return sorted(link.get("ifname") for link in ipr.get_links())

        assert in_thread(ns, links) == ["lo", "pistioin", "pistioout"]  # no TAP was created
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        delete_netns(ns)
    assert ns not in list_netns()


def test_kernel_geneve_probe_is_private() -> None:
    """The probe answers like the kernel's module inventory and leaves no namespace behind."""
    from netlab.geneve.kernel import geneve_link_kwargs, kernel_geneve_supported

    release = os.uname().release
    mods = Path("/lib/modules") / release
    expected = Path("/sys/module/geneve").exists() or any(
        "geneve" in (mods / f).read_text() for f in ("modules.dep", "modules.builtin") if (mods / f).exists())
    assert kernel_geneve_supported(prefix="hg") is expected
    assert not [n for n in list_netns() if n.startswith("hg-probe-")]
    assert geneve_link_kwargs("istioout", OUTBOUND_TUN_VNI, "10.244.1.3") == {
        "ifname": "istioout", "kind": "geneve", "geneve_id": 1001, "geneve_remote": "10.244.1.3"}
