"""Observed hops, and the lab geography needed to name them (where a netns is, what an interface
is called in a contract).

Why symbolic names: a node's pod-side veths are called ``veth2695b381`` (a hash, so names fit
IFNAMSIZ), which a contract written before the lab existed cannot know. ``veth(foo/sleep)``,
``veth(ztunnel)`` and ``veth(waypoint:bar-2)`` say what a reader of the seed article means.

Frames are parsed here with ``struct`` instead of scapy: a trace only needs addresses, ports,
TCP flags and the Geneve header, and this keeps ``netlab trace`` well under its 1 s budget.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from netlab.plan.types import Plan

GENEVE_PORT = 6081
TCP_SYN, TCP_ACK = 0x02, 0x10


# ---- where things are -----------------------------------------------------------------------
@dataclass(frozen=True)
class Place:
    at: str  # node:<n> | pod:<ns>/<pod> | ztunnel:<n> | waypoint:<ns>/<name> | fabric
    node: str
    kind: Literal["node", "pod", "ztunnel", "waypoint", "fabric"]
    mode: str = ""  # pod mode (ambient/sidecar/plain) for pods


class Geography:
    """Maps netns -> place and (netns, iface) -> symbolic name, from the lab's plan."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.places: dict[str, Place] = {}
        for n in plan.nodes:
            self.places[n.netns] = Place(f"node:{n.name}", n.name, "node")
        for p in plan.pods:
            if p.mode == "ztunnel":
                self.places[p.netns] = Place(f"ztunnel:{p.node}", p.node, "ztunnel")
            elif p.mode == "waypoint":
                self.places[p.netns] = Place(f"waypoint:{p.ref}", p.node, "waypoint")
            else:
                self.places[p.netns] = Place(f"pod:{p.ref}", p.node, "pod", p.mode)
        for x in plan.netns:
            if x.role == "fabric":
                self.places[x.name] = Place("fabric", "", "fabric")
        self.sym: dict[tuple[str, str], str] = {}
        pods_by_netns = {p.netns: p for p in plan.pods}
        for link in plan.links:
            if link.kind == "veth" and link.peer_netns in pods_by_netns:
                p = pods_by_netns[link.peer_netns]
                name = {"ztunnel": "veth(ztunnel)", "waypoint": f"veth(waypoint:{p.namespace})"}.get(p.mode, f"veth({p.ref})")
                self.sym[(link.netns, link.name)] = name
        self.tunnels = {(link.netns, link.name): link for link in plan.links if link.kind in ("tap", "geneve")}
        self.local_ips: dict[str, set[str]] = {}
        for a in plan.addresses:
            self.local_ips.setdefault(a.netns, set()).add(a.ip)
        for p in plan.pods:
            self.local_ips.setdefault(p.netns, set()).add(p.ip)

    def place(self, netns: str) -> Place:
        return self.places.get(netns, Place(netns, "", "fabric"))

    def iface_sym(self, netns: str, iface: str) -> str:
        return self.sym.get((netns, iface), iface)

    def targets(self) -> list[tuple[str, str]]:
        """Every interface of every lab namespace but the fabric's (the fabric bridge only repeats
        what the nodes' eth0 already show), plus ``lo`` where a proxy redirects through it."""
        out: set[tuple[str, str]] = set()
        for link in self.plan.links:
            for ns, name in ((link.netns, link.name), (link.peer_netns, link.peer_name)):
                if ns and name and self.place(ns).kind != "fabric":
                    out.add((ns, name))
        inpod = self.plan.datapath == "inpod"  # ztunnel listens in each enrolled pod, reached over lo
        for p in self.plan.pods:
            if p.mode in ("sidecar", "waypoint") or (inpod and p.mode == "ambient"):
                out.add((p.netns, "lo"))
        return sorted(out)


# ---- frames ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seg:
    """A TCP segment (possibly found inside a Geneve frame)."""

    src: str
    sport: int
    dst: str
    dport: int
    flags: int
    encap: dict[str, Any] | None = None

    @property
    def is_syn(self) -> bool:
        return self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN


def parse_frame(raw: bytes, depth: int = 0) -> Seg | None:
    """Ethernet/IPv4/TCP, or Ethernet/IPv4/UDP:6081/Geneve/Ethernet/IPv4/TCP; else None."""
    if len(raw) < 34:
        return None
    etype = struct.unpack_from("!H", raw, 12)[0]
    off = 14
    if etype == 0x8100:
        etype = struct.unpack_from("!H", raw, 16)[0]
        off = 18
    if etype != 0x0800:
        return None
    ihl = (raw[off] & 0x0F) * 4
    proto = raw[off + 9]
    src, dst = socket.inet_ntoa(raw[off + 12:off + 16]), socket.inet_ntoa(raw[off + 16:off + 20])
    l4 = off + ihl
    if len(raw) < l4 + 8:
        return None
    sport, dport = struct.unpack_from("!HH", raw, l4)
    if proto == 6 and len(raw) >= l4 + 14:
        return Seg(src, sport, dst, dport, raw[l4 + 13])
    if proto == 17 and dport == GENEVE_PORT and depth == 0 and len(raw) >= l4 + 16:
        g = l4 + 8
        opt_len = (raw[g] & 0x3F) * 4
        ptype = struct.unpack_from("!H", raw, g + 2)[0]
        vni = int.from_bytes(raw[g + 4:g + 7], "big")
        if ptype != 0x6558:  # Transparent Ethernet Bridging
            return None
        inner = parse_frame(raw[g + 8 + opt_len:], depth + 1)
        if inner is None:
            return None
        enc = {"type": "geneve", "vni": vni, "outer_src": src, "outer_dst": dst}
        return Seg(inner.src, inner.sport, inner.dst, inner.dport, inner.flags, enc)
    return None


# ---- an observed hop -------------------------------------------------------------------------
@dataclass
class ObservedHop:
    kind: Literal["packet", "proxy"]
    t: float
    at: str
    netns: str
    node: str
    src: str = ""
    dst: str = ""
    iface: str | None = None
    iface_sym: str | None = None
    dir: Literal["in", "out"] | None = None
    proto: str = "tcp"
    encap: dict[str, Any] | None = None
    mark: int | None = None
    rules: list[str] = field(default_factory=list)
    rules_unconfirmed: list[str] = field(default_factory=list)
    route: str = ""
    table: int | None = None
    proxy: dict[str, Any] | None = None
    what: str = ""
    seed_n: str | None = None
    n: int = 0
    leg: int = 0  # index of the TCP leg (connection) this hop belongs to

    @property
    def port(self) -> int | None:
        """Destination port of the SYN; for a proxy hop, the listener's port."""
        if self.kind == "proxy" and self.proxy:
            return _port(self.proxy.get("listener", ""))
        return _port(self.dst)

    @property
    def listener_sym(self) -> str | None:
        """``ztunnel:15001`` / ``sidecar:15006`` / ``waypoint:15008`` for proxy hops."""
        if self.kind != "proxy" or not self.proxy:
            return None
        comp = self.proxy.get("component", "")
        kind = "ztunnel" if comp.startswith("ztunnel-") else "sidecar" if comp.endswith("-sidecar") else "waypoint"
        return f"{kind}:{_port(self.proxy.get('listener', ''))}"

    def short(self) -> str:
        if self.kind == "proxy":
            return f"{self.at} listener {self.listener_sym} ({self.src} -> {self.dst})"
        s = f"{self.at} {self.iface_sym} {self.dir} {self.src} -> {self.dst}"
        if self.table is not None:
            s += f" table {self.table}"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "seed_n": self.seed_n, "t": self.t, "kind": self.kind, "at": self.at,
            "netns": self.netns, "node": self.node, "iface": self.iface, "iface_sym": self.iface_sym,
            "dir": self.dir, "src": self.src, "dst": self.dst, "proto": self.proto, "encap": self.encap,
            "mark": hex(self.mark) if self.mark is not None else None, "rules": list(self.rules),
            "route": self.route, "proxy": self.proxy, "what": self.what,
        }


def _port(s: str) -> int | None:
    _, _, p = s.rpartition(":")
    return int(p) if p.isdigit() else None
