"""The lab's IPv4 ranges: none may overlap another, and handing out addresses costs per address.

A lab that comes up with two ranges overlapping looks fine and carries no traffic (a pod CIDR
over Istio's tunnel link nets takes the routes of istioin/istioout; a fabric over the service
range gives a node a VIP's address), so every range is checked against every other one the lab
uses, and against the ranges no pod or node may hold (loopback, link-local, multicast, ...).

Allocation walks a range with an integer cursor: a /8 service range or a /1 pod CIDR costs the
same as a /24. (``list(net.hosts())`` of a /8 took 20 s and 1.6 GB.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

from netlab import istio
from netlab.errors import TopologyError

# (what, range): ranges the lab itself uses or that no node or pod address may be in
RESERVED: tuple[tuple[str, IPv4Network], ...] = (
    ("Istio's inbound tunnel link net (istioin)", IPv4Network(f"{istio.INBOUND_TUN_IP}/24", strict=False)),
    ("Istio's outbound tunnel link net (istioout)", IPv4Network(f"{istio.OUTBOUND_TUN_IP}/24", strict=False)),
    ("'this network' (RFC 1122)", IPv4Network("0.0.0.0/8")),
    ("loopback", IPv4Network("127.0.0.0/8")),
    ("link-local", IPv4Network("169.254.0.0/16")),
    ("multicast", IPv4Network("224.0.0.0/4")),
    ("reserved (RFC 1112, with the broadcast address)", IPv4Network("240.0.0.0/4")),
)


def check_disjoint(ranges: Sequence[tuple[str, IPv4Network]]) -> None:
    """Raise TopologyError naming both fields when two of ``ranges`` (field, network), or one of
    them and a :data:`RESERVED` range, overlap. A sweep over the ranges sorted by first address:
    O(n log n) for n nodes, not a comparison of every pair."""
    named = [*((f"{field} {net}", net) for field, net in ranges), *((f"{what} {net} (reserved)", net) for what, net in RESERVED)]
    order = sorted(range(len(named)), key=lambda i: (int(named[i][1].network_address), i))
    widest = -1  # the range seen so far that reaches furthest
    for i in order:
        net = named[i][1]
        if widest >= 0 and int(net.network_address) <= int(named[widest][1].broadcast_address):
            a, b = sorted((i, widest))  # in the order given: the user's field first, a reserved range last
            raise TopologyError(f"{named[a][0]} overlaps {named[b][0]}")
        if widest < 0 or int(net.broadcast_address) > int(named[widest][1].broadcast_address):
            widest = i


def fabric_prefix_for(nodes: int) -> int:
    """The longest prefix whose fabric holds ``nodes`` nodes at .2 .. .(nodes+1), below broadcast."""
    return 32 - (nodes + 2).bit_length()


class AddressPool:
    """The addresses of ``net`` from ``.first`` on, in order, never the broadcast address.

    O(1) memory; ``take`` skips addresses in ``taken`` (set aside by the topology itself)."""

    def __init__(self, net: IPv4Network, first: int = 1, taken: frozenset[IPv4Address] = frozenset()) -> None:
        self.net = net
        self._next = int(net.network_address) + first
        self._last = int(net.broadcast_address) - 1
        self._taken = taken

    def take_top(self) -> IPv4Address | None:
        """The highest free address (below broadcast), downward: waypoints take these, so one
        added to or removed from the end of a lab's list moves no other pod (`netlab waypoint`)."""
        while self._next <= self._last:
            a = ipaddress.IPv4Address(self._last)
            self._last -= 1
            if a not in self._taken:
                return a
        return None

    def take(self) -> IPv4Address | None:
        """The next free address, or None when the range is used up."""
        while self._next <= self._last:
            a = ipaddress.IPv4Address(self._next)
            self._next += 1
            if a not in self._taken:
                return a
        return None
