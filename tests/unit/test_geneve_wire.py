"""Geneve wire format: our encoder against RFC 8926 field layout, scapy's decoder and the kernel's
source-port/ECN rules. No root needed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from netlab.geneve import wire
from netlab.geneve.encap import Tunnel
from netlab.istio import GENEVE_DST_PORT, GENEVE_PROTO_TEB, OUTBOUND_TUN_VNI

MAC_A, MAC_B = "02:00:00:00:a0:01", "02:00:00:00:b0:01"


def tcp_frame(src: str, dst: str, sport: int, dport: int, tos: int = 0) -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst, tos=tos) / TCP(sport=sport, dport=dport) / b"x")


def test_header_bytes_exact() -> None:
    # version 0, opt_len 0, O=0 C=0, proto 0x6558, VNI 1001 = 0x0003e9, reserved 0
    assert wire.encode_header(OUTBOUND_TUN_VNI) == bytes.fromhex("00 00 6558 0003e9 00")


@given(vni=st.integers(0, wire.VNI_MAX), proto=st.sampled_from([GENEVE_PROTO_TEB, 0x0800, 0x86DD]))
def test_round_trip(vni: int, proto: int) -> None:
    h = wire.decode_header(wire.encode_header(vni, proto) + b"payload")
    assert (h.vni, h.proto, h.opt_len, h.oam, h.critical, h.version, h.length) == (vni, proto, 0, False, False, 0, 8)


def test_decode_flags_and_options() -> None:
    raw = bytes([0x02, 0xC0]) + (0x6558).to_bytes(2, "big") + (7 << 8).to_bytes(4, "big") + b"\xaa" * 8 + b"frame"
    h = wire.decode_header(raw)
    assert (h.vni, h.opt_len, h.oam, h.critical, h.length) == (7, 8, True, True, 16)
    with pytest.raises(wire.GeneveError):
        wire.decode_header(raw[:12])  # options cut short
    with pytest.raises(wire.GeneveError):
        wire.decode_header(b"\0" * 7)


@pytest.mark.parametrize("vni", [-1, wire.VNI_MAX + 1])
def test_vni_range(vni: int) -> None:
    with pytest.raises(ValueError):
        wire.encode_header(vni)


def test_scapy_decodes_our_datagram() -> None:
    inner = Ether(src=MAC_A, dst=MAC_B) / IP(src="192.168.127.1", dst="192.168.127.2") / ICMP(id=77) / b"ping"
    sport = wire.SourcePorts(secret=b"k" * 16)(bytes(inner))
    dgram = wire.encapsulate(bytes(inner), OUTBOUND_TUN_VNI, sport)
    pkt = IP(src="10.9.0.1", dst="10.9.0.2") / UDP(bytes(dgram))
    pkt = IP(bytes(pkt))  # re-dissect from bytes: UDP dport 6081 binds GENEVE
    u = pkt[UDP]
    assert (u.sport, u.dport, u.len, u.chksum) == (sport, GENEVE_DST_PORT, 8 + 8 + len(inner), 0)
    g = pkt[GENEVE]
    assert (g.version, g.optionlen, g.oam, g.critical, g.proto, g.vni) == (0, 0, 0, 0, 0x6558, OUTBOUND_TUN_VNI)
    assert bytes(g.payload) == bytes(inner)
    assert pkt[ICMP].id == 77 and pkt[Raw].load == b"ping"


def test_fold_port_matches_kernel_formula() -> None:
    # udp_flow_src_port(net, skb, 1, USHRT_MAX, true): hash ^= hash << 16; ((u64)hash * 65534 >> 32) + 1
    for h in (1, 0xDEADBEEF, 0xFFFFFFFF, 0x0001_0000, 12345):
        x = (h ^ (h << 16)) & 0xFFFFFFFF
        assert wire.fold_port(h) == ((x * 65534) >> 32) + 1
        assert 1 <= wire.fold_port(h) <= 65534


def test_source_port_per_flow() -> None:
    ports = wire.SourcePorts(secret=b"s" * 16)
    f1 = tcp_frame("10.0.0.1", "10.0.0.2", 40000, 80)
    assert ports(f1) == ports(tcp_frame("10.0.0.1", "10.0.0.2", 40000, 80))  # same flow, same port
    assert ports(f1) == ports(tcp_frame("10.0.0.2", "10.0.0.1", 80, 40000))  # both directions agree
    spread = {ports(tcp_frame("10.0.0.1", "10.0.0.2", sp, 80)) for sp in range(40000, 40200)}
    assert len(spread) > 190 and all(1 <= p <= 65534 for p in spread)
    # another process (another random key) picks other ports, as another boot would
    assert wire.SourcePorts(secret=b"t" * 16)(f1) != ports(f1)


def test_flow_key_non_ip_and_fragments() -> None:
    arp1 = bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="192.168.127.1", pdst="192.168.127.2"))
    arp2 = bytes(Ether(src=MAC_B, dst=MAC_A) / ARP(op=2, psrc="192.168.127.2", pdst="192.168.127.1"))
    assert wire.flow_key(arp1) == wire.flow_key(arp2) == b"\x08\x06"
    frag = bytes(Ether() / IP(src="1.1.1.1", dst="2.2.2.2", flags="MF") / UDP(sport=1, dport=2))
    assert wire.flow_key(frag).endswith(b"\0" * 8)  # no ports for fragments
    v6 = bytes(Ether() / IPv6(src="fd00::1", dst="fd00::2", fl=5) / TCP(sport=1, dport=2))
    v6b = bytes(Ether() / IPv6(src="fd00::1", dst="fd00::2", fl=5) / TCP(sport=3, dport=4))
    assert wire.flow_key(v6) == wire.flow_key(v6b)  # flow label stops the dissector before L4


@pytest.mark.parametrize(("inner_tos", "outer"), [(0x00, 0), (0xB8, 0), (0x01, 1), (0x02, 2), (0x03, 2), (0xBB, 2)])
def test_outer_tos_copies_only_ecn(inner_tos: int, outer: int) -> None:
    assert wire.outer_tos(tcp_frame("1.1.1.1", "2.2.2.2", 1, 2, tos=inner_tos)) == outer


def test_outer_tos_ipv6_and_arp() -> None:
    assert wire.outer_tos(bytes(Ether() / IPv6(tc=0x03) / TCP())) == 2
    assert wire.outer_tos(bytes(Ether() / IPv6(tc=0x01) / TCP())) == 1
    assert wire.outer_tos(bytes(Ether() / ARP())) == 0


def test_ecn_decapsulate() -> None:
    ect0 = bytearray(tcp_frame("1.1.1.1", "2.2.2.2", 1, 2, tos=0x02))
    assert wire.ecn_decapsulate(0x03, ect0)
    ip = IP(bytes(ect0[14:]))
    assert ip.tos & 3 == 3
    got = ip.chksum
    del ip.chksum  # let scapy recompute over the modified header
    assert got == IP(bytes(ip)).chksum
    not_ect = bytearray(tcp_frame("1.1.1.1", "2.2.2.2", 1, 2, tos=0x00))
    assert not wire.ecn_decapsulate(0x03, not_ect)  # CE over not-ECT: kernel drops
    assert wire.ecn_decapsulate(0x02, not_ect) and not_ect[15] == 0
    v6 = bytearray(bytes(Ether() / IPv6(tc=0x02) / TCP()))
    assert wire.ecn_decapsulate(0x03, v6) and IPv6(bytes(v6[14:])).tc == 0x03


def test_ipv4_checksum_against_scapy() -> None:
    hdr = bytearray(bytes(IP(src="10.1.2.3", dst="10.3.2.1", ttl=7, id=4242)))[:20]
    want = int.from_bytes(hdr[10:12], "big")
    hdr[10:12] = b"\0\0"
    assert wire.ipv4_checksum(hdr) == want


def test_tunnel_spec() -> None:
    assert Tunnel.parse("istioout:1001:10.244.1.3") == Tunnel("istioout", 1001, "10.244.1.3")
    assert Tunnel.parse("pistioin:1000:10.244.1.1").spec() == "pistioin:1000:10.244.1.1"
    for bad in ("istioout:1001", "x:notanint:1.2.3.4", "x:1:1.2.3", "x:16777216:1.1.1.1", "a" * 16 + ":1:1.1.1.1"):
        with pytest.raises(ValueError):
            Tunnel.parse(bad)


def test_relay_refuses_ambiguous_tunnels() -> None:
    from netlab.geneve.encap import Encapsulator

    with pytest.raises(ValueError):  # same VNI + remote twice: the kernel says EBUSY
        Encapsulator([Tunnel("a", 1001, "10.0.0.1"), Tunnel("b", 1001, "10.0.0.1")])
    with pytest.raises(ValueError):
        Encapsulator([])
    # same VNI, different remotes is fine (demuxed by outer source, like geneve_lookup)
    Encapsulator([Tunnel("a", 1001, "10.0.0.1"), Tunnel("b", 1001, "10.0.0.2")]).close()
