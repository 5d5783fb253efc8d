"""Acceptance tests for the ambient datapath: reference §8 A, C and E, and §3 eligibility.

Labs come up with ``mesh=False``: every ambient rule, ipset, route and the userspace Geneve
tunnels are in place, but no ztunnel runs, so this file puts *stand-in listeners* on ztunnel's
ports (IP_TRANSPARENT sockets on 0.0.0.0:15001/15006/15008 inside the ztunnel netns, as ztunnel
binds them, §4.2). A connection that lands there with the original destination as its local
address proves that the node rules, the tunnel and the in-pod TPROXY rules carried it.

Every socket is created by a thread that is inside the netns it belongs to (``in_netns``), and
every capture is an AF_PACKET socket opened inside its netns (``netlab.verify.sniff``).
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import IP, TCP, UDP

from netlab.istio import (
    GENEVE_DST_PORT,
    INBOUND_TUN,
    INBOUND_TUN_POD,
    INBOUND_TUN_VNI,
    OUTBOUND_TUN,
    OUTBOUND_TUN_POD,
    OUTBOUND_TUN_VNI,
)
from netlab.lab import Lab
from netlab.netns import in_netns
from netlab.plan.types import NodeInfo, PodInfo
from netlab.verify.sniff import BPF_SYN_OR_GENEVE, Capture, Captured

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

IP_TRANSPARENT = 19
ZT_OUTBOUND_PORT, ZT_INBOUND_PORT, ZT_HBONE_PORT = 15001, 15006, 15008
SIDECAR_UID = 1337
UDP_PORT = 9999
BPF = f"tcp or udp port {GENEVE_DST_PORT} or udp port {UDP_PORT}"
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------- helpers: sockets inside namespaces

def run_in(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread inside ``netns`` (so sockets it makes live there)."""
    box: list[Any] = []

    def body() -> None:
        try:
            with in_netns(netns):
                box.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def tcp_listener(netns: str, port: int) -> socket.socket:
    """A stand-in for a ztunnel listener: IP_TRANSPARENT, bound to 0.0.0.0:port (§4.2)."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        return s
    return run_in(netns, make)


def tcp_socket(netns: str, *, fsuid: int | None = None) -> socket.socket:
    """A TCP socket of ``netns``; with ``fsuid`` its file carries that uid/gid, which is what
    iptables' ``-m owner`` matches (the thread's fsuid at ``socket()`` time; per-thread call)."""
    def make() -> socket.socket:
        if fsuid is None:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _libc.setfsgid(fsuid)
        _libc.setfsuid(fsuid)
        try:
            assert _libc.setfsuid(-1) == fsuid, "setfsuid did not take"
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            _libc.setfsuid(0)
            _libc.setfsgid(0)
    return run_in(netns, make)


def _dump(cap: Capture) -> str:
    return "\n".join(str(c) for c in cap.packets) or "(nothing)"


def connect(client: socket.socket, addr: tuple[str, int], cap: Capture, timeout: float = 3.0) -> int:
    """Connect and return the client port; on failure show what the capture saw."""
    client.settimeout(timeout)
    try:
        client.connect(addr)
    except OSError as e:
        raise AssertionError(f"connect to {addr} failed ({e}); captured:\n{_dump(cap)}") from None
    return client.getsockname()[1]


def accept(listener: socket.socket, cap: Capture, what: str, timeout: float = 3.0) -> socket.socket:
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        raise AssertionError(f"{what}: nothing accepted within {timeout}s; captured:\n{_dump(cap)}") from None
    return conn


def assert_no_pending(listener: socket.socket, why: str) -> None:
    listener.setblocking(False)
    try:
        conn, peer = listener.accept()
    except BlockingIOError:
        return
    conn.close()
    raise AssertionError(f"{why}: unexpected connection from {peer}")


def mangle_counters(netns: str, chain: str) -> list[tuple[int, str]]:
    """(packets, rule spec) of ``chain`` in the mangle table of ``netns``, in rule order."""
    out = subprocess.run(["ip", "netns", "exec", netns, "iptables-legacy-save", "-c", "-t", "mangle"],
                         capture_output=True, text=True, check=True).stdout
    rules = []
    for line in out.splitlines():
        if line.startswith("[") and f" -A {chain} " in line:
            cnt, spec = line.split(f" -A {chain} ", 1)
            rules.append((int(cnt.strip("[]").split(":")[0]), spec))
    assert rules, f"no rules in mangle {chain} of {netns}"
    return rules


def counter(rules: list[tuple[int, str]], needle: str) -> int:
    hits = [n for n, spec in rules if needle in spec]
    assert len(hits) == 1, f"{needle!r} matches {len(hits)} rules"
    return hits[0]


CAPTURE_RULE = "--match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100"  # §1.5 #15
UDP_SKIP_RULE = "-p udp -j MARK --set-xmark 0x220/0x220"  # §1.5 #13


# ---------------------------------------------------------------- helpers: reading captures

def flow(src: str, dst: str, dport: int, sport: int | None = None, proto: type = TCP) -> Callable[[Any], bool]:
    """Predicate on a scapy (sub)packet: an IP packet of this flow (outermost IP layer)."""
    def f(p: Any) -> bool:
        return (IP in p and p[IP].src == src and p[IP].dst == dst and proto in p
                and p[proto].dport == dport and (sport is None or p[proto].sport == sport))
    return f


def plain(match: Callable[[Any], bool]) -> Callable[[Captured], bool]:
    """Not encapsulated, and the flow matches."""
    return lambda c: GENEVE not in c.pkt and match(c.pkt)


def geneve(match: Callable[[Any], bool]) -> Callable[[Captured], bool]:
    """A Geneve frame whose inner packet matches."""
    return lambda c: GENEVE in c.pkt and match(c.pkt[GENEVE].payload)


def is_syn(p: Any) -> bool:
    return TCP in p and p[TCP].flags == "S"


def one(cap: Capture, netns: str, iface: str, direction: str, pred: Callable[[Captured], bool],
        timeout: float = 2.0) -> Captured:
    hits = cap.wait_for(lambda c: c.netns == netns and c.iface == iface and c.direction == direction and pred(c),
                        timeout=timeout)
    assert hits, f"expected packet not seen on {netns}/{iface}/{direction}; saw:\n" + \
        "\n".join(str(c) for c in cap.packets)
    return hits[0]


def ztunnel_of(lab: Lab, node: str) -> PodInfo:
    return next(p for p in lab.plan.pods if p.mode == "ztunnel" and p.node == node)


# ---------------------------------------------------------------- labs

def _up(topology: str, name: str, tmp: Any) -> Iterator[Lab]:
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: conftest's per-test run dir is too short-lived
        mp.setenv("NETLAB_RUN_DIR", str(tmp.mktemp(name)))
        Lab.down_lab(name)  # leftovers of an interrupted run
        lab = Lab.up(topology, name=name, tunnel="userspace", mesh=False)
        try:
            yield lab
        finally:
            Lab.down_lab(name)


@pytest.fixture(scope="module")
def amb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _up("ambient-to-ambient", "hd-amb", tmp_path_factory)


@pytest.fixture(scope="module")
def coex(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _up("coexistence", "hd-coex", tmp_path_factory)


# ---------------------------------------------------------------- §8 A: outbound capture

def test_outbound_syn_goes_through_istioout_to_15001(amb: Lab) -> None:
    """foo/sleep (node-a) -> bar/httpbin (node-b):80. The SYN enters node-a on sleep's veth, is
    marked 0x100 and routed into istioout, crosses the node<->ztunnel veth as Geneve VNI 1001 to
    ZT_IP:6081 (outer source HOST_IP_BR), decapsulates on pistioout, and TPROXY hands it to
    15001 with the original destination as local address. Later packets of the connection skip
    the tunnel (connmark 0x210 -> 0x040 -> table 102, §8 A.8)."""
    sleep, hb = amb.plan.pod("foo/sleep"), amb.plan.pod("bar/httpbin")
    node: NodeInfo = amb.plan.node("node-a")
    zt = ztunnel_of(amb, "node-a")
    lis = tcp_listener(zt.netns, ZT_OUTBOUND_PORT)
    client = tcp_socket(sleep.netns)
    before = mangle_counters(node.netns, "ztunnel-PREROUTING")
    targets = [(node.netns, sleep.host_veth), (node.netns, OUTBOUND_TUN), (node.netns, zt.host_veth),
               (zt.netns, OUTBOUND_TUN_POD), (node.netns, "eth0")]
    try:
        with Capture(targets, bpf=BPF) as cap:
            cport = connect(client, (hb.ip, 80), cap)
            conn = accept(lis, cap, "stand-in ztunnel :15001")
            assert conn.getsockname() == (hb.ip, 80), "15001 sees the original destination as local address"
            assert conn.getpeername() == (sleep.ip, cport), "and the pod's own address as peer"
            # the payload really rides this connection
            client.sendall(b"hd-probe")
            assert conn.recv(16) == b"hd-probe"
            conn.close()
            f = flow(sleep.ip, hb.ip, 80, cport)
            syn = lambda p: f(p) and is_syn(p)  # noqa: E731
            on_veth = one(cap, node.netns, sleep.host_veth, "in", plain(syn))
            on_out = one(cap, node.netns, OUTBOUND_TUN, "out", plain(syn))
            enc = one(cap, node.netns, zt.host_veth, "out", geneve(syn))
            on_pod = one(cap, zt.netns, OUTBOUND_TUN_POD, "in", plain(syn))
            ack = one(cap, node.netns, zt.host_veth, "out", plain(lambda p: f(p) and p[TCP].flags == "A"))
    finally:
        lis.close()
        client.close()

    outer = enc.pkt
    assert outer[GENEVE].vni == OUTBOUND_TUN_VNI
    assert outer[UDP].dport == GENEVE_DST_PORT
    assert outer[IP].dst == zt.ip, "outer destination is the ztunnel pod IP"
    assert outer[IP].src == node.host_ip, "outer source is HOST_IP_BR, the pistioout remote (§2.1)"
    assert on_veth.timestamp <= on_out.timestamp <= enc.timestamp <= on_pod.timestamp <= ack.timestamp
    # only SYNs were encapsulated; nothing of the flow went to the wire directly
    tunnelled = cap.select(iface=zt.host_veth, where=geneve(f))
    assert tunnelled and all(is_syn(c.pkt[GENEVE].payload) for c in tunnelled), [str(c) for c in tunnelled]
    assert not cap.select(netns=node.netns, iface="eth0", where=plain(f))
    after = mangle_counters(node.netns, "ztunnel-PREROUTING")
    assert counter(after, CAPTURE_RULE) > counter(before, CAPTURE_RULE), "§1.5 #15 marked the SYN 0x100"


# ---------------------------------------------------------------- §8 C: inbound capture

@pytest.mark.parametrize("client_ref", ["legacy/sleep", "ztunnel:node-a"])
def test_inbound_goes_through_istioin_to_15008_or_15006(coex: Lab, client_ref: str) -> None:
    """A non-mesh client on node-a (a plain pod, or ztunnel-a itself) -> bar-1/httpbin (ambient,
    node-b) on :15008 and :80. Node-b routes both via table 100 into istioin (VNI 1000) to
    pistioin; TPROXY sends :15008 to 15008 and everything else to 15006 (§2.2), never 15001.
    The pod's own veth never sees them."""
    hb = coex.plan.pod("bar-1/httpbin")
    node_b = coex.plan.node("node-b")
    ztb = ztunnel_of(coex, "node-b")
    client_ns = coex.netns_of(client_ref)
    client_ip = ztunnel_of(coex, "node-a").ip if client_ref.startswith("ztunnel:") else coex.plan.pod(client_ref).ip
    listeners = {p: tcp_listener(ztb.netns, p) for p in (ZT_OUTBOUND_PORT, ZT_INBOUND_PORT, ZT_HBONE_PORT)}
    clients: list[socket.socket] = []
    targets = [(node_b.netns, "eth0"), (node_b.netns, INBOUND_TUN), (node_b.netns, ztb.host_veth),
               (ztb.netns, INBOUND_TUN_POD), (node_b.netns, hb.host_veth)]
    try:
        with Capture(targets, bpf=BPF) as cap:
            for dport, lport in ((ZT_HBONE_PORT, ZT_HBONE_PORT), (80, ZT_INBOUND_PORT)):
                c = tcp_socket(client_ns)
                clients.append(c)
                cport = connect(c, (hb.ip, dport), cap)
                conn = accept(listeners[lport], cap, f"stand-in ztunnel :{lport} for :{dport}")
                assert conn.getsockname() == (hb.ip, dport), f":{dport} lands on {lport} with its original destination"
                assert conn.getpeername() == (client_ip, cport), "the client's address is kept"
                conn.close()
                syn = lambda p, f=flow(client_ip, hb.ip, dport, cport): f(p) and is_syn(p)  # noqa: E731, B008
                wire = one(cap, node_b.netns, "eth0", "in", plain(syn))
                tun = one(cap, node_b.netns, INBOUND_TUN, "out", plain(syn))
                enc = one(cap, node_b.netns, ztb.host_veth, "out", geneve(syn))
                pod = one(cap, ztb.netns, INBOUND_TUN_POD, "in", plain(syn))
                assert enc.pkt[GENEVE].vni == INBOUND_TUN_VNI
                assert (enc.pkt[IP].dst, enc.pkt[UDP].dport) == (ztb.ip, GENEVE_DST_PORT)
                assert enc.pkt[IP].src == node_b.host_ip
                assert wire.timestamp <= tun.timestamp <= enc.timestamp <= pod.timestamp
                assert not cap.select(iface=hb.host_veth, where=plain(flow(client_ip, hb.ip, dport, cport))), \
                    "intercepted before the pod's veth"
            for p, lis in listeners.items():
                assert_no_pending(lis, f"listener {p}")
    finally:
        for s in [*clients, *listeners.values()]:
            s.close()


# ---------------------------------------------------------------- §8 E: UDP bypass

def test_udp_from_ambient_pod_bypasses_the_tunnels(amb: Lab) -> None:
    """UDP from foo/sleep gets 0x220 (§1.5 #13) -> main: straight out node-a's eth0 to httpbin,
    never on istioout, never Geneve on the ztunnel veth."""
    sleep, hb = amb.plan.pod("foo/sleep"), amb.plan.pod("bar/httpbin")
    node = amb.plan.node("node-a")
    zt = ztunnel_of(amb, "node-a")

    def udp_server() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((hb.ip, UDP_PORT))
        return s

    server = run_in(hb.netns, udp_server)
    client = run_in(sleep.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    before = mangle_counters(node.netns, "ztunnel-PREROUTING")
    targets = [(node.netns, sleep.host_veth), (node.netns, "eth0"), (node.netns, OUTBOUND_TUN),
               (node.netns, zt.host_veth), (zt.netns, OUTBOUND_TUN_POD)]
    try:
        with Capture(targets, bpf=BPF) as cap:
            client.sendto(b"hd-udp-probe", (hb.ip, UDP_PORT))
            server.settimeout(3)
            try:
                data, peer = server.recvfrom(64)
            except TimeoutError:
                raise AssertionError(f"UDP never reached bar/httpbin; captured:\n{_dump(cap)}") from None
            assert data == b"hd-udp-probe" and peer == (sleep.ip, client.getsockname()[1])
            f = flow(sleep.ip, hb.ip, UDP_PORT, proto=UDP)
            on_veth = one(cap, node.netns, sleep.host_veth, "in", plain(f))
            on_wire = one(cap, node.netns, "eth0", "out", plain(f))
            assert on_veth.timestamp <= on_wire.timestamp
            time.sleep(0.05)  # a stray copy through the userspace relay would come later than the wire copy
    finally:
        server.close()
        client.close()
    for iface in (OUTBOUND_TUN, zt.host_veth, OUTBOUND_TUN_POD):
        leaked = [str(c) for c in cap.select(iface=iface) if UDP in c.pkt and
                  (f(c.pkt) or (GENEVE in c.pkt and f(c.pkt[GENEVE].payload)))]
        assert not leaked, f"UDP went through {iface}: {leaked}"
    after = mangle_counters(node.netns, "ztunnel-PREROUTING")
    assert counter(after, UDP_SKIP_RULE) > counter(before, UDP_SKIP_RULE), "§1.5 #13 marked it 0x220"
    assert counter(after, CAPTURE_RULE) == counter(before, CAPTURE_RULE)


# ---------------------------------------------------------------- §3: non-ambient pods are not captured

@pytest.mark.parametrize("client_ref", ["legacy/sleep", "sc/sleep"])
def test_non_ambient_pods_on_the_node_are_not_captured(coex: Lab, client_ref: str) -> None:
    """A plain pod (legacy) and a sidecar pod (sc; socket owned by uid/gid 1337 so its own
    istio-iptables lets it out, as the sidecar's would) on node-a connect to bar/httpbin on
    node-b. Not in ztunnel-pods-ips, so no 0x100: the SYN leaves by eth0, never via istioout or
    the ztunnel veth, and reaches the destination pod with the client's own address."""
    client_pod, hb = coex.plan.pod(client_ref), coex.plan.pod("bar/httpbin")
    node = coex.plan.node("node-a")
    zt = ztunnel_of(coex, "node-a")
    # bar/httpbin is a sidecar pod: its istio-iptables redirect :80 to 15006 in its own netns
    inbound = tcp_listener(hb.netns, ZT_INBOUND_PORT)
    sidecar = client_pod.mode == "sidecar"
    client = tcp_socket(client_pod.netns, fsuid=SIDECAR_UID if sidecar else None)
    before = mangle_counters(node.netns, "ztunnel-PREROUTING")
    sc_before = _nat_owner_return(client_pod.netns) if sidecar else 0
    targets = [(node.netns, client_pod.host_veth), (node.netns, "eth0"), (node.netns, OUTBOUND_TUN),
               (node.netns, zt.host_veth), (zt.netns, OUTBOUND_TUN_POD)]
    try:
        with Capture(targets, bpf=BPF) as cap:
            cport = connect(client, (hb.ip, 80), cap)
            conn = accept(inbound, cap, "bar/httpbin's inbound :15006")
            assert conn.getpeername() == (client_pod.ip, cport), "no proxy in between on node-a"
            conn.close()
            f = flow(client_pod.ip, hb.ip, 80, cport)
            syn = lambda p: f(p) and is_syn(p)  # noqa: E731
            on_veth = one(cap, node.netns, client_pod.host_veth, "in", plain(syn))
            on_wire = one(cap, node.netns, "eth0", "out", plain(syn))
            assert on_veth.timestamp <= on_wire.timestamp
            time.sleep(0.05)
    finally:
        inbound.close()
        client.close()
    for iface in (OUTBOUND_TUN, zt.host_veth, OUTBOUND_TUN_POD):
        leaked = [str(c) for c in cap.select(iface=iface)
                  if f(c.pkt) or (GENEVE in c.pkt and f(c.pkt[GENEVE].payload))]
        assert not leaked, f"{client_ref} was captured via {iface}: {leaked}"
    after = mangle_counters(node.netns, "ztunnel-PREROUTING")
    assert counter(after, CAPTURE_RULE) == counter(before, CAPTURE_RULE), "§1.5 #15 must not mark it 0x100"
    if sidecar:
        assert _nat_owner_return(client_pod.netns) > sc_before, "the socket really was uid 1337's"


def _nat_owner_return(netns: str) -> int:
    """Packets that the sidecar pod's ``ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN`` let out."""
    out = subprocess.run(["ip", "netns", "exec", netns, "iptables-legacy-save", "-c", "-t", "nat"],
                         capture_output=True, text=True, check=True).stdout
    hits = [int(line[1:].split(":")[0]) for line in out.splitlines()
            if line.startswith("[") and line.endswith("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN")]
    assert len(hits) == 1, out
    return hits[0]


def test_capture_reports_missing_interface(amb: Lab) -> None:
    """The sniffer names the target it could not open, instead of capturing somewhere else."""
    from netlab.verify.sniff import CaptureError

    node = amb.plan.node("node-a")
    with pytest.raises(CaptureError, match="no-such-if"):
        Capture([(node.netns, "eth0"), (node.netns, "no-such-if")]).start()


def test_syn_or_geneve_filter_as_netlab_trace_uses_it(amb: Lab) -> None:
    """The capture as ``netlab trace`` runs it: the fixed SYN/Geneve program (no libpcap) keeps
    the flow's SYN and drops its other segments; an interface the plan names but the kernel lacks
    is listed in ``missing``, not fatal; stamps are integer ns, ordered along the walk."""
    sleep, hb = amb.plan.pod("foo/sleep"), amb.plan.pod("bar/httpbin")
    node = amb.plan.node("node-a")
    zt = ztunnel_of(amb, "node-a")
    lis = tcp_listener(zt.netns, ZT_OUTBOUND_PORT)
    client = tcp_socket(sleep.netns)
    targets = [(node.netns, sleep.host_veth), (node.netns, zt.host_veth), (node.netns, "no-such-if")]
    try:
        with Capture(targets, bpf=BPF_SYN_OR_GENEVE, skip_missing=True) as cap:
            cport = connect(client, (hb.ip, 80), cap)
            conn = accept(lis, cap, "stand-in ztunnel :15001")
            client.sendall(b"hd-probe")
            assert conn.recv(16) == b"hd-probe"
            conn.close()
            f = flow(sleep.ip, hb.ip, 80, cport)
            syn = lambda p: f(p) and is_syn(p)  # noqa: E731
            on_veth = one(cap, node.netns, sleep.host_veth, "in", plain(syn))
            enc = one(cap, node.netns, zt.host_veth, "out", geneve(syn))
    finally:
        lis.close()
        client.close()
    assert cap.missing == [(node.netns, "no-such-if")]
    assert isinstance(on_veth.timestamp_ns, int) and on_veth.timestamp_ns <= enc.timestamp_ns
    assert abs(on_veth.timestamp - on_veth.timestamp_ns / 1e9) < 1e-6  # the same stamp in float seconds
    seen = cap.select(netns=node.netns, iface=sleep.host_veth, where=plain(f))
    assert seen and all(is_syn(c.pkt) for c in seen), [str(c) for c in seen]  # data and ACKs filtered out
