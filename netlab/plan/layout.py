"""How apply lays a plan out: which namespaces are pods and which infrastructure, what is made in
which order, and which work lands in which namespace. Pure: computed from the plan alone, so it
is tested without root (tests/unit/test_layout.py) and apply only carries it out.

A *pod* (leaf) netns owns no device and no veth into it has a ``master``: apply makes it, its
veth (node end first, the pod's end as the peer) and everything in it in one visit, from inside
it. Every other netns (fabric, nodes) is *infrastructure*. The order, in apply's phases:

1. pods phase: the infrastructure netns that other netns's devices land in (:attr:`Layout.hubs`,
   the nodes) are made first, with their own devices (:attr:`Layout.hub_links`); the ones nobody's
   devices land in (:attr:`Layout.loose`, the fabric) are made alongside, their devices
   (:attr:`Layout.loose_links`) once the hubs exist; then every pod (:attr:`Layout.pods`).
2. configure phase: per infrastructure netns (:attr:`Layout.configure`), the veth ends other
   netns made there brought up, then its addresses, routes, ip rules, sysctls, ipsets, iptables.
3. files.

Early sysctls (:func:`is_early_sysctl`) are written as soon as their netns exists, before its
devices (:attr:`Layout.early`). Every veth end that lands in an infrastructure netns from
elsewhere gets an ifindex chosen by apply (:attr:`Layout.far_ends`, in the order apply numbers
them), so the configure phase knows its devices without a dump.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from netlab.plan.types import Address, IpSet, IpSetEntry, IptChain, IptRule, Link, Netns, Plan, Route, Rule, Sysctl


@dataclass(slots=True)
class NetnsWork:
    """What apply writes into one netns besides its devices, by kind, in plan order."""

    addresses: list[Address] = field(default_factory=list)
    sysctls: list[Sysctl] = field(default_factory=list)  # the late ones (early: Layout.early)
    ipsets: list[IpSet] = field(default_factory=list)
    ipset_entries: list[IpSetEntry] = field(default_factory=list)
    ipt_chains: list[IptChain] = field(default_factory=list)
    ipt_rules: list[IptRule] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)

    def count(self) -> int:
        return (len(self.addresses) + len(self.sysctls) + len(self.ipsets) + len(self.ipset_entries)
                + len(self.ipt_chains) + len(self.ipt_rules) + len(self.routes) + len(self.rules))


#: The sections of a plan that become NetnsWork (the rest: netns, links, files, processes).
WORK_SECTIONS = ("addresses", "sysctls", "ipsets", "ipset_entries", "ipt_chains", "ipt_rules", "routes", "rules")


@dataclass(slots=True)
class PodLayout:
    """A pod netns, made in one visit: ``inbound`` are the veths into it (made from inside it,
    their other end in a node), ``work`` the rest of what is in it."""

    netns: Netns
    inbound: list[Link]
    work: NetnsWork


@dataclass(slots=True)
class InfraConfig:
    """The configure step of one infrastructure netns: ``ups`` are the veth ends other
    infrastructure netns made here, (link, the end's device name), brought up first."""

    netns: str
    ups: list[tuple[Link, str]]
    work: NetnsWork


@dataclass(slots=True)
class Layout:
    """A plan as apply carries it out (see the module docstring)."""

    pods: list[PodLayout]
    hubs: list[Netns]  # infrastructure netns other netns's devices land in: made first
    hub_links: list[tuple[str, list[Link]]]  # (netns, the devices it makes) of the hubs
    loose: list[Netns]  # infrastructure netns no device lands in (the fabric)
    loose_links: list[tuple[str, list[Link]]]
    configure: list[InfraConfig]
    early: dict[str, list[Sysctl]]  # netns -> sysctls written before its devices
    far_ends: list[tuple[str, str]]  # (netns, device): veth ends whose ifindex apply chooses
    pod_hosts: set[str]  # netns that hold pod veths' far ends (nodes)

    def work_count(self) -> int:
        """Objects the configure phase writes (its progress total)."""
        return sum(c.work.count() for c in self.configure)


def is_early_sysctl(key: str) -> bool:
    """A sysctl that sets what devices made later start with, so it is written when its netns
    is new: ``net.ipv{4,6}.conf.default.*``, and ``net.ipv4.ip_forward`` (it sets ``all`` and
    ``default``; written late, it walks every device already there, 1000s on a node)."""
    parts = key.split(".")
    if key == "net.ipv4.ip_forward":
        return True
    return len(parts) == 5 and parts[0] == "net" and parts[2] == "conf" and parts[3] == "default"


def layout(plan: Plan) -> Layout:
    """Lay ``plan`` out for apply (one pass over its links and sections; no kernel)."""
    owners = {link.netns for link in plan.links}
    into: dict[str, list[Link]] = defaultdict(list)
    for link in plan.links:
        if link.kind == "veth" and link.peer_netns:
            into[link.peer_netns].append(link)
    # a leaf (a pod) owns no device; each veth into it is made from inside it, so one visit
    # to the pod's netns creates it, its veth and everything else in it
    leaves = {n.name for n in plan.netns
              if n.name not in owners and all(link.master is None for link in into.get(n.name, ()))}
    work: dict[str, NetnsWork] = defaultdict(NetnsWork)
    early: dict[str, list[Sysctl]] = defaultdict(list)
    for sc in plan.sysctls:
        (early[sc.netns] if is_early_sysctl(sc.key_name) else work[sc.netns].sysctls).append(sc)
    for section in WORK_SECTIONS:
        if section != "sysctls":
            for o in getattr(plan, section):
                getattr(work[o.netns], section).append(o)
    inverted = {link.key for leaf in leaves for link in into.get(leaf, ())}

    infra = [n for n in plan.netns if n.name not in leaves]
    by_owner: dict[str, list[Link]] = defaultdict(list)
    far_ends: list[tuple[str, str]] = []
    pod_hosts: set[str] = set()
    for link in plan.links:
        if link.key in inverted:
            far_ends.append((link.netns, link.name))
            pod_hosts.add(link.netns)
            continue
        by_owner[link.netns].append(link)
        if link.kind == "veth" and link.peer_netns and link.peer_netns not in leaves and link.peer_name:
            # (the kernel takes a veth's peer index only when the first end's is given too)
            far_ends += [(link.netns, link.name), (link.peer_netns, link.peer_name)]
    # The netns other netns's devices land in (nodes) are made first; one nobody's devices land
    # in (the fabric) alongside, its devices once the nodes they reach exist.
    needed = {link.peer_netns for link in plan.links if link.key not in inverted} | \
             {link.netns for link in plan.links if link.key in inverted}
    loose = [n for n in infra if n.name not in needed]
    configure = []
    for n in infra:
        ups = [(link, link.peer_name) for link in into.get(n.name, ()) if link.key not in inverted and link.peer_name]
        if ups or n.name in work or n.name in pod_hosts:
            configure.append(InfraConfig(n.name, ups, work.get(n.name) or NetnsWork()))
    return Layout(
        pods=[PodLayout(n, into.get(n.name, []), work.get(n.name) or NetnsWork()) for n in plan.netns if n.name in leaves],
        hubs=[n for n in infra if n.name in needed],
        hub_links=[(n, ls) for n, ls in by_owner.items() if n in needed],
        loose=loose,
        loose_links=[(n.name, by_owner[n.name]) for n in loose if by_owner.get(n.name)],
        configure=configure, early=dict(early), far_ends=far_ends, pod_hosts=pod_hosts)
