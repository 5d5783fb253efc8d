"""Geneve (RFC 8926) on the wire, as Linux ``drivers/net/geneve.c`` sends it.

The lab's kernel has no geneve module, so the four Istio tunnels (§1.3, §2.1) are TAP devices
plus a userspace relay (:mod:`netlab.geneve.encap`). This module is the relay's pure part: the
header codec, the UDP source-port choice and the ECN rules, with no sockets, so it is unit-tested
without root and cross-checked against scapy and tshark.

What the kernel puts on the wire for ``ip link add X type geneve id VNI remote R`` (no other
options), read from ``geneve_xmit_skb``/``geneve_build_header``/``geneve_nl2info``, and how the
relay reproduces it:

* Geneve header: version 0, no options (opt_len 0), O=0, C=0, reserved 0, protocol 0x6558
  (ETH_P_TEB, Ethernet payload), 24-bit VNI, reserved byte 0. Identical.
* UDP destination port: 6081 (``GENEVE_UDP_PORT``). Identical.
* UDP source port: ``udp_flow_src_port(net, skb, 1, USHRT_MAX, true)`` — the inner skb's flow
  hash folded into [1, 65535): ``h ^= h << 16; port = ((h * 65534) >> 32) + 1``. The fold is the
  kernel's; the hash is not: the kernel uses ``skb->hash`` (a random per-socket ``sk_txhash`` for
  locally generated TCP, or the flow dissector keyed by a per-boot random secret). We hash the
  same flow keys (addresses, L4 ports or ICMP echo id, consistent-ified so both directions agree;
  only the EtherType for non-IP frames such as ARP) with a per-process random key. **Deliberate
  difference:** port *values* differ from any kernel; the properties (same inner flow -> same
  port, flows spread over 1..65534, never 0) are the same.
* UDP checksum: 0 (IPv4 geneve devices have ``TUNNEL_CSUM`` clear unless ``udpcsum`` is given,
  so ``udp_tunnel_xmit_skb(..., nocheck=true)``). Identical.
* Outer IPv4 (built by the kernel for our SOCK_RAW/IPPROTO_UDP socket, not by us): TTL from
  ``ip4_dst_hoplimit`` (route metric, else ``net.ipv4.ip_default_ttl``, 64); DF clear
  (``GENEVE_DF_UNSET``; the relay sets ``IP_PMTUDISC_DONT``); IP ID from ``__ip_select_ident``
  (the kernel does that for every non-DF packet, tunnel or socket); source chosen by routing (no
  ``local``). Identical.
* Outer TOS: ``ip_tunnel_ecn_encap(0, inner)`` = only the inner ECN bits, CE mapped to ECT(0)
  (:func:`outer_tos`). Identical (sent as an ``IP_TOS`` control message when non-zero).

Receive follows ``geneve_udp_encap_recv``/``geneve_rx``: drop version != 0, drop protocols other
than TEB/IPv4/IPv6 before the lookup, accept only (VNI, outer source) == (device id, remote),
then drop non-TEB payloads, critical options, frames whose Ethernet source is the device's own
MAC, and outer-CE over a not-ECT inner packet; set CE on the inner packet when the outer is CE
(:func:`ecn_decapsulate`).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from netlab.istio import GENEVE_DST_PORT, GENEVE_IPV4_OVERHEAD, GENEVE_PROTO_TEB

GENEVE_VERSION = 0
GENEVE_HLEN = 8  # fixed part; options follow, opt_len * 4 bytes
UDP_HLEN = 8
ETH_HLEN = 14
VNI_MAX = (1 << 24) - 1
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ACCEPTED_PROTOS = frozenset({GENEVE_PROTO_TEB, ETH_P_IP, ETH_P_IPV6})  # checked before the lookup
# Outer + UDP + Geneve + inner Ethernet: what a kernel geneve device subtracts from the
# underlay MTU when it derives its own; the plan (which cannot import this module) has it as a number.
assert GENEVE_IPV4_OVERHEAD == 20 + UDP_HLEN + GENEVE_HLEN + ETH_HLEN

ECN_MASK = 0x3
ECN_NOT_ECT, ECN_ECT_1, ECN_ECT_0, ECN_CE = 0, 1, 2, 3

_HDR = struct.Struct("!BBHI")  # ver|optlen, O|C|rsvd, proto, vni<<8|rsvd
_UDP_GENEVE = struct.Struct("!HHHHBBHI")  # UDP header + Geneve fixed header, one pack per packet


class GeneveError(ValueError):
    """A datagram is not a Geneve packet this implementation (or the kernel) accepts."""


@dataclass(frozen=True)
class GeneveHeader:
    vni: int
    proto: int = GENEVE_PROTO_TEB
    opt_len: int = 0  # in bytes (the wire field counts 4-byte words)
    oam: bool = False
    critical: bool = False
    version: int = GENEVE_VERSION

    @property
    def length(self) -> int:
        """Header length including options, i.e. where the payload starts."""
        return GENEVE_HLEN + self.opt_len


def encode_header(vni: int, proto: int = GENEVE_PROTO_TEB) -> bytes:
    """The 8-byte Geneve header ``geneve_build_header`` writes for a plain (no options) device."""
    if not 0 <= vni <= VNI_MAX:
        raise ValueError(f"VNI {vni} out of range 0..{VNI_MAX}")
    return _HDR.pack(GENEVE_VERSION << 6, 0, proto, vni << 8)


def decode_header(buf: bytes | memoryview) -> GeneveHeader:
    """Parse the fixed header (and skip options). Raises GeneveError if too short."""
    if len(buf) < GENEVE_HLEN:
        raise GeneveError(f"{len(buf)} bytes is shorter than a Geneve header")
    b0, b1, proto, vni_rsvd = _HDR.unpack_from(buf)
    hdr = GeneveHeader(
        vni=vni_rsvd >> 8,
        proto=proto,
        opt_len=(b0 & 0x3F) * 4,
        oam=bool(b1 & 0x80),
        critical=bool(b1 & 0x40),
        version=b0 >> 6,
    )
    if len(buf) < hdr.length:
        raise GeneveError(f"options ({hdr.opt_len} bytes) run past the end of the datagram")
    return hdr


def udp_geneve_header(sport: int, vni: int, payload_len: int, dport: int = GENEVE_DST_PORT) -> bytes:
    """UDP header (checksum 0, as the kernel sends for IPv4) + Geneve header, for ``payload_len``
    bytes of inner Ethernet frame. What the relay's raw socket sends in front of the frame."""
    return _UDP_GENEVE.pack(sport, dport, UDP_HLEN + GENEVE_HLEN + payload_len, 0, 0, 0,
                            GENEVE_PROTO_TEB, vni << 8)


def encapsulate(frame: bytes, vni: int, sport: int, dport: int = GENEVE_DST_PORT) -> bytes:
    """UDP datagram (header included) carrying ``frame``; convenience for tests and tools."""
    return udp_geneve_header(sport, vni, len(frame), dport) + frame


# ---------------------------------------------------------------- UDP source port

def fold_port(flow_hash: int, lo: int = 1, hi: int = 0xFFFF) -> int:
    """``udp_flow_src_port``'s fold of a 32-bit hash into [lo, hi)."""
    h = flow_hash & 0xFFFFFFFF
    h ^= (h << 16) & 0xFFFFFFFF
    return ((h * (hi - lo)) >> 32) + lo


def flow_key(frame: bytes | memoryview) -> bytes:
    """The inner flow, as the kernel's flow dissector sees it for ``skb_get_hash``.

    IPv4/IPv6: protocol, addresses and (TCP/UDP/SCTP/UDP-Lite/DCCP) ports or the ICMP echo id,
    ordered so both directions give the same key (``__flow_hash_consistentify``). Fragments and
    IPv6 packets with a flow label stop before L4. Anything else: just the EtherType (the
    dissector finds no addresses in ARP, so every ARP frame hashes alike).
    """
    if len(frame) < ETH_HLEN:
        return bytes(frame)
    etype = int.from_bytes(frame[12:14], "big")
    if etype == ETH_P_IP and len(frame) >= ETH_HLEN + 20:
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        src, dst = bytes(frame[26:30]), bytes(frame[30:34])
        frag = int.from_bytes(frame[20:22], "big") & 0x3FFF  # MF + offset
        l4 = ETH_HLEN + ihl
        ports = _l4_ports(frame, proto, l4) if not frag else (0, 0)
    elif etype == ETH_P_IPV6 and len(frame) >= ETH_HLEN + 40:
        proto = frame[20]
        src, dst = bytes(frame[22:38]), bytes(frame[38:54])
        label = int.from_bytes(frame[15:18], "big") & 0xFFFFF
        ports = (label, 0) if label else _l4_ports(frame, proto, ETH_HLEN + 40)
        if label:
            proto = 0
    else:
        return etype.to_bytes(2, "big")
    sp, dp = ports
    if dst < src or (dst == src and dp < sp):
        src, dst, sp, dp = dst, src, dp, sp
    return bytes([proto]) + src + dst + sp.to_bytes(4, "big") + dp.to_bytes(4, "big")


def _l4_ports(frame: bytes | memoryview, proto: int, off: int) -> tuple[int, int]:
    if proto in (6, 17, 33, 132, 136) and len(frame) >= off + 4:
        return int.from_bytes(frame[off:off + 2], "big"), int.from_bytes(frame[off + 2:off + 4], "big")
    if proto in (1, 58) and len(frame) >= off + 6:
        icmp_type = frame[off]
        if icmp_type in (0, 8, 128, 129):  # echo: the id identifies the "flow"
            return int.from_bytes(frame[off + 4:off + 6], "big"), 0
    return 0, 0


class SourcePorts:
    """Per-flow UDP source port, stable for the life of the object (one relay process).

    Results are cached per flow key; the cache is simply dropped when it grows past ``limit``.
    """

    def __init__(self, secret: bytes | None = None, limit: int = 65536) -> None:
        self._secret = secret if secret is not None else os.urandom(16)
        self._cache: dict[bytes, int] = {}
        self._limit = limit

    def port_for_key(self, key: bytes) -> int:
        port = self._cache.get(key)
        if port is None:
            h = int.from_bytes(hashlib.blake2s(key, digest_size=4, key=self._secret).digest(), "big")
            port = fold_port(h or 1)  # the kernel never uses a zero hash either
            if len(self._cache) >= self._limit:
                self._cache.clear()
            self._cache[key] = port
        return port

    def __call__(self, frame: bytes | memoryview) -> int:
        return self.port_for_key(flow_key(frame))


# ---------------------------------------------------------------- ECN (RFC 6040 as in inet_ecn.h)

def inner_dsfield(frame: bytes | bytearray | memoryview) -> int | None:
    """The inner IPv4 TOS / IPv6 traffic class, or None for non-IP frames."""
    if len(frame) < ETH_HLEN + 2:
        return None
    etype = (frame[12] << 8) | frame[13]
    if etype == ETH_P_IP:
        return frame[15]
    if etype == ETH_P_IPV6:
        return ((frame[14] & 0x0F) << 4) | (frame[15] >> 4)
    return None


def outer_tos(frame: bytes | memoryview, tos: int = 0) -> int:
    """``ip_tunnel_ecn_encap(tos, inner)``: device TOS (0 here) plus the inner ECN bits, CE -> ECT(0)."""
    inner = inner_dsfield(frame) or 0
    ecn = inner & ECN_MASK
    return (tos & ~ECN_MASK) | (ECN_ECT_0 if ecn == ECN_CE else ecn)


def ecn_decapsulate(outer: int, frame: bytearray) -> bool:
    """``IP_ECN_decapsulate``: update ``frame`` in place; False means the kernel drops it.

    Outer CE marks an ECT inner packet CE; outer ECT(1) turns inner ECT(0) into ECT(1); outer CE
    over a not-ECT inner packet is dropped (``err > 1`` in ``geneve_rx``).
    """
    inner = inner_dsfield(frame)
    if inner is None:
        return True
    o, i = outer & ECN_MASK, inner & ECN_MASK
    if i == ECN_NOT_ECT:
        return o != ECN_CE
    if o == ECN_CE:
        _set_inner_ecn(frame, ECN_CE)
    elif o == ECN_ECT_1 and i == ECN_ECT_0:
        _set_inner_ecn(frame, ECN_ECT_1)
    return True


def _set_inner_ecn(frame: bytearray, ecn: int) -> None:
    etype = (frame[12] << 8) | frame[13]
    if etype == ETH_P_IP:
        frame[15] = (frame[15] & ~ECN_MASK) | ecn
        ihl = (frame[14] & 0x0F) * 4
        frame[24:26] = b"\0\0"
        frame[24:26] = ipv4_checksum(frame[ETH_HLEN:ETH_HLEN + ihl]).to_bytes(2, "big")
    else:  # IPv6: traffic class straddles bytes 0-1 of the header
        frame[15] = (frame[15] & 0xCF) | (ecn << 4)


def ipv4_checksum(header: bytes | bytearray | memoryview) -> int:
    """RFC 1071 one's-complement sum over an IPv4 header (checksum field zeroed by the caller)."""
    data = bytes(header)
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
