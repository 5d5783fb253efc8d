"""Synthetic plans for the kernel tests of apply and destroy and for ``scripts/bench-up``: any
number of nodes and pods, without a topology file (and without its files and processes).

They follow the lab's conventions (fabric bridge ``br0`` in ``<lab>-fabric``; node ``eth0``
on 172.172.0.0/24, fabric end named after the node; ptp pods: ``10.0.N.x/32`` on ``eth0``,
``10.0.N.1 dev eth0 scope link``, default via ``10.0.N.1``; node side ``10.0.N.1/32`` on every
pod veth and ``10.0.N.x/32 dev vethX scope link``). With ``istio_rules=True`` the Istio objects
come from the plan's own builders: node 1 gets §1 (``netlab.plan.ambient.node_objects``, the
Geneve devices as TAPs) with its other pods enrolled (§3) but without their table-100 routes (no
Geneve relay runs, and the tests ping between pods), its first pod is the ztunnel (§2,
``ztunnel_objects``) and the first pod of node 2 gets the sidecar rules (§6,
``netlab.plan.sidecar.sidecar_objects``). Processes are left out: apply does not start them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from typing import Any

from netlab.plan import ambient, sidecar
from netlab.plan.types import (
    Address,
    File,
    IpSet,
    IpSetEntry,
    IptChain,
    IptRule,
    Link,
    Netns,
    NodeInfo,
    Plan,
    PodInfo,
    Process,
    Route,
    Rule,
    Sysctl,
)

FABRIC_NET = "172.172.0"


def node_ip(n: int) -> str:
    return f"{FABRIC_NET}.{n + 1}"


def pod_cidr(n: int, pods_per_node: int) -> ipaddress.IPv4Network:
    """``10.0.N.0/24`` as in the lab's convention; ``10.N.0.0/16`` when a node has more pods."""
    return ipaddress.IPv4Network(f"10.0.{n}.0/24" if pods_per_node <= 250 else f"10.{n}.0.0/16")


def pod_ip(n: int, j: int, pods_per_node: int = 2) -> str:
    """Pod ``j`` of node ``n``; ``j = -1`` is the node's gateway address (``.1``)."""
    return str(pod_cidr(n, pods_per_node)[j + 2])


def host_veth(lab: str, pod_netns: str) -> str:
    return "veth" + hashlib.sha256(f"{lab}/{pod_netns}".encode()).hexdigest()[:8]


def build(lab: str, nodes: int = 2, pods_per_node: int = 2, *, istio_rules: bool = False,
          files: bool = False) -> Plan:
    """A fabric + ``nodes`` nodes + ``pods_per_node`` ptp pods each, routed to each other."""
    fabric = f"{lab}-fabric"
    ns_, links, addrs, routes, rules, sysctls = [Netns(fabric, "fabric", "fabric")], [], [], [], [], []
    ipsets, entries, chains, ipt_rules, file_objs, node_infos, pod_infos = [], [], [], [], [], [], []
    links.append(Link(fabric, "br0", "bridge", mac="02:00:00:00:00:01"))
    for n in range(1, nodes + 1):
        node = f"node-{n}"
        nns = f"{lab}-{node}"
        host_ip = pod_ip(n, -1, pods_per_node)  # 10.0.N.1
        ns_.append(Netns(nns, "node", node))
        node_infos.append(NodeInfo(node, nns, node_ip(n), str(pod_cidr(n, pods_per_node)), host_ip))
        links.append(Link(fabric, node, "veth", peer_netns=nns, peer_name="eth0", master="br0"))
        addrs.append(Address(nns, "eth0", node_ip(n), 24))
        sysctls.append(Sysctl(nns, "net.ipv4.ip_forward", "1"))
        sysctls.append(Sysctl(nns, "net.ipv6.conf.default.disable_ipv6", "1"))  # as plan.build does
        for m in range(1, nodes + 1):
            if m != n:
                routes.append(Route(nns, str(pod_cidr(m, pods_per_node)), gateway=node_ip(m)))
        for j in range(pods_per_node):
            pns = f"{lab}-n{n}-p{j}"
            veth = host_veth(lab, pns)
            ip = pod_ip(n, j, pods_per_node)
            ns_.append(Netns(pns, "pod", f"default/p{n}-{j}"))
            pod_infos.append(PodInfo(f"p{n}-{j}", "default", node, pns, ip, "plain", f"p{j}", "default", (), veth))
            links.append(Link(nns, veth, "veth", peer_netns=pns, peer_name="eth0"))
            addrs.append(Address(pns, "eth0", ip, 32))
            addrs.append(Address(nns, veth, host_ip, 32))
            routes.append(Route(pns, f"{host_ip}/32", dev="eth0", scope="link"))
            routes.append(Route(pns, "0.0.0.0/0", dev="eth0", gateway=host_ip))
            routes.append(Route(nns, f"{ip}/32", dev=veth, scope="link"))
            if files:
                file_objs.append(File(f"/etc/netns/{pns}/hosts", f"127.0.0.1 localhost\n{ip} p{n}-{j}\n"))
    if istio_rules and nodes >= 1 and pods_per_node >= 1:
        node1 = [p for p in pod_infos if p.node == "node-1"]
        zt, enrolled = node1[0], [dataclasses.replace(p, mode="ambient") for p in node1[1:]]
        host_ip = node_infos[0].host_ip
        objs: list[Any] = ambient.node_objects(f"{lab}-node-1", "node-1", host_ip, zt, [], "userspace")
        for p in enrolled:  # §3 without the table-100 route (see the module docstring)
            objs += [o for o in ambient.enrollment_objects(f"{lab}-node-1", host_ip, p) if not isinstance(o, Route)]
        objs += ambient.ztunnel_objects(zt.netns, "node-1", zt, host_ip, "userspace")
        if nodes >= 2:
            objs += sidecar.sidecar_objects(f"{lab}-n2-p0")
        kinds = {Link: links, Address: addrs, Route: routes, Rule: rules, Sysctl: sysctls, IpSet: ipsets,
                 IpSetEntry: entries, IptChain: chains, IptRule: ipt_rules, Process: []}
        for o in objs:
            kinds[type(o)].append(o)
    return Plan(lab=lab, topology="sample", source="tests/sample_plans.py", tunnel="userspace",
                nodes=tuple(node_infos), pods=tuple(pod_infos), services=(), netns=tuple(ns_), links=tuple(links),
                addresses=tuple(addrs), routes=tuple(routes), rules=tuple(rules), sysctls=tuple(sysctls),
                ipsets=tuple(ipsets), ipset_entries=tuple(entries), ipt_chains=tuple(chains),
                ipt_rules=tuple(ipt_rules), files=tuple(file_objs))


def single_node(lab: str, pods: int) -> Plan:
    """The benchmark shape: fabric + one node + ``pods`` pods with one veth each."""
    return build(lab, nodes=1, pods_per_node=pods)
