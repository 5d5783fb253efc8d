"""Synthetic plans for kernel tests and ``scripts/bench-up``, built directly as plan values.

They follow the lab's conventions (fabric bridge ``br0`` in ``<lab>-fabric``; node ``eth0``
on 172.172.0.0/24, fabric end named after the node; ptp pods: ``10.0.N.x/32`` on ``eth0``,
``10.0.N.1 dev eth0 scope link``, default via ``10.0.N.1``; node side ``10.0.N.1/32`` on every
pod veth and ``10.0.N.x/32 dev vethX scope link``). With ``istio=True`` node 1 also gets the
reference's node rules (§1.4-§1.7 minus the geneve devices, which this kernel lacks), its
first pod the ztunnel-netns rules (§2.2-§2.3) and a pod on node 2 the sidecar nat rules (§6).
"""

from __future__ import annotations

import hashlib
import ipaddress

from netlab import istio
from netlab.plan.types import (Address, File, IpSet, IpSetEntry, IptChain, IptRule, Link, Netns, NodeInfo, Plan,
                               PodInfo, Route, Rule, Sysctl)

FABRIC_NET = "172.172.0"


def node_ip(n: int) -> str:
    return f"{FABRIC_NET}.{n + 1}"


def pod_cidr(n: int, pods_per_node: int) -> ipaddress.IPv4Network:
    """``10.0.N.0/24`` as in the lab's convention; ``10.N.0.0/16`` when a node has more pods."""
    return ipaddress.ip_network(f"10.0.{n}.0/24" if pods_per_node <= 250 else f"10.{n}.0.0/16")


def pod_ip(n: int, j: int, pods_per_node: int = 2) -> str:
    """Pod ``j`` of node ``n``; ``j = -1`` is the node's gateway address (``.1``)."""
    return str(pod_cidr(n, pods_per_node)[j + 2])


def host_veth(lab: str, pod_netns: str) -> str:
    return "veth" + hashlib.sha256(f"{lab}/{pod_netns}".encode()).hexdigest()[:8]


def mangle_node_rules(zt_veth: str, zt_ip: str, host_ip: str) -> list[tuple[str, str, str]]:
    """(table, chain, spec) of §1.5 in iptables-save form."""
    m = istio.mark
    pre = istio.CHAIN_ZT_PREROUTING
    rules = [
        ("mangle", pre, f"-i {istio.INBOUND_TUN} -j MARK --set-xmark {m(istio.SKIP_MARK)}"),
        ("mangle", pre, f"-i {istio.INBOUND_TUN} -j RETURN"),
        ("mangle", pre, f"-i {istio.OUTBOUND_TUN} -j MARK --set-xmark {m(istio.SKIP_MARK)}"),
        ("mangle", pre, f"-i {istio.OUTBOUND_TUN} -j RETURN"),
        ("mangle", pre, f"-p udp -m udp --dport {istio.GENEVE_DST_PORT} -j RETURN"),
        ("mangle", pre, f"-m connmark --mark {m(istio.CONN_SKIP_MARK)} -j MARK --set-xmark {m(istio.SKIP_MARK)}"),
        ("mangle", pre, f"-m mark --mark {m(istio.SKIP_MARK)} -j RETURN"),
        ("mangle", pre, f"! -i {zt_veth} -m connmark --mark {m(istio.PROXY_MARK)} -j MARK --set-xmark 0x40/0x40"),
        ("mangle", pre, "-m mark --mark 0x40/0x40 -j RETURN"),
        ("mangle", pre, f"! -s {zt_ip}/32 -i {zt_veth} -j MARK --set-xmark {m(istio.PROXY_MARK)}"),
        ("mangle", pre, f"-m mark --mark {m(istio.SKIP_MARK)} -j RETURN"),
        ("mangle", pre, f"-i {zt_veth} -j MARK --set-xmark {m(istio.CONN_SKIP_MARK)}"),
        ("mangle", pre, f"-p udp -j MARK --set-xmark {m(istio.CONN_SKIP_MARK)}"),
        ("mangle", pre, f"-m mark --mark {m(istio.SKIP_MARK)} -j RETURN"),
        ("mangle", pre, f"-p tcp -m set --match-set {istio.ZTUNNEL_PODS_IPSET} src "
                        f"-j MARK --set-xmark {m(istio.OUTBOUND_MARK)}"),
    ]
    for chain in (istio.CHAIN_ZT_FORWARD, istio.CHAIN_ZT_INPUT):
        for v in (istio.CONN_SKIP_MARK, istio.PROXY_MARK):
            rules.append(("mangle", chain, f"-m mark --mark {m(v)} -j CONNMARK --save-mark --nfmask {v:#x} --ctmask {v:#x}"))
    rules.append(("mangle", istio.CHAIN_ZT_OUTPUT, f"-s {host_ip}/32 -j MARK --set-xmark 0x220/0xffffffff"))
    rules.append(("nat", istio.CHAIN_ZT_PREROUTING, f"-m mark --mark {m(istio.OUTBOUND_MARK)} -j ACCEPT"))
    rules.append(("nat", istio.CHAIN_ZT_PREROUTING, f"-p udp -m set --match-set {istio.ZTUNNEL_PODS_IPSET} src "
                                                    f"-m udp --dport 53 -j DNAT --to-destination {zt_ip}:15053"))
    rules.append(("nat", istio.CHAIN_ZT_POSTROUTING, f"-m mark --mark {m(istio.OUTBOUND_MARK)} -j ACCEPT"))
    return rules


def ztunnel_ns_rules(zt_ip: str) -> list[str]:
    """§2.2 mangle PREROUTING rules in iptables-save form."""
    tp = f"--on-ip {istio.TPROXY_ON_IP} --tproxy-mark {istio.TPROXY_MARK:#x}/{istio.TPROXY_MASK:#x}"
    return [
        f"-i {istio.INBOUND_TUN_POD} -p tcp -m tcp --dport {istio.HBONE_PORT} -j TPROXY --on-port {istio.HBONE_PORT} {tp}",
        f"-i {istio.OUTBOUND_TUN_POD} -p tcp -j TPROXY --on-port {istio.ZTUNNEL_OUTBOUND_PORT} {tp}",
        f"-i {istio.INBOUND_TUN_POD} -p tcp -j TPROXY --on-port {istio.ZTUNNEL_INBOUND_PLAINTEXT_PORT} {tp}",
        f"! -d {zt_ip}/32 -i {istio.ZT_POD_IF} -p tcp -j MARK --set-xmark "
        f"{istio.ORG_SRC_RET_MARK:#x}/{istio.TPROXY_MASK:#x}",
    ]


SIDECAR_NAT = [  # §6, as iptables-legacy-save prints it
    ("PREROUTING", "-p tcp -j ISTIO_INBOUND"),
    ("OUTPUT", "-p tcp -j ISTIO_OUTPUT"),
    ("ISTIO_INBOUND", "-p tcp -m tcp --dport 15008 -j RETURN"),
    ("ISTIO_INBOUND", "-p tcp -m tcp --dport 15090 -j RETURN"),
    ("ISTIO_INBOUND", "-p tcp -m tcp --dport 15021 -j RETURN"),
    ("ISTIO_INBOUND", "-p tcp -m tcp --dport 15020 -j RETURN"),
    ("ISTIO_INBOUND", "-p tcp -j ISTIO_IN_REDIRECT"),
    ("ISTIO_IN_REDIRECT", "-p tcp -j REDIRECT --to-ports 15006"),
    ("ISTIO_OUTPUT", "-s 127.0.0.6/32 -o lo -j RETURN"),
    ("ISTIO_OUTPUT", "! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 "
                     "-j ISTIO_IN_REDIRECT"),
    ("ISTIO_OUTPUT", "-o lo -m owner ! --uid-owner 1337 -j RETURN"),
    ("ISTIO_OUTPUT", "-m owner --uid-owner 1337 -j RETURN"),
    ("ISTIO_OUTPUT", "! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 "
                     "-j ISTIO_IN_REDIRECT"),
    ("ISTIO_OUTPUT", "-o lo -m owner ! --gid-owner 1337 -j RETURN"),
    ("ISTIO_OUTPUT", "-m owner --gid-owner 1337 -j RETURN"),
    ("ISTIO_OUTPUT", "-d 127.0.0.1/32 -j RETURN"),
    ("ISTIO_OUTPUT", "-j ISTIO_REDIRECT"),
    ("ISTIO_REDIRECT", "-p tcp -j REDIRECT --to-ports 15001"),
]


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
        nns = f"{lab}-node-1"
        zt_ns, zt_veth = f"{lab}-n1-p0", host_veth(lab, f"{lab}-n1-p0")
        zt_ip, host_ip = pod_ip(1, 0, pods_per_node), pod_ip(1, -1, pods_per_node)
        ipsets.append(IpSet(nns, istio.ZTUNNEL_PODS_IPSET))
        for j in range(1, pods_per_node):
            entries.append(IpSetEntry(nns, istio.ZTUNNEL_PODS_IPSET, pod_ip(1, j, pods_per_node), comment=f"uid-p1-{j}"))
        for table, jumps in (("nat", ("PREROUTING", "POSTROUTING")),
                             ("mangle", ("PREROUTING", "POSTROUTING", "OUTPUT", "INPUT", "FORWARD"))):
            for b in jumps:
                chains.append(IptChain(nns, table, f"ztunnel-{b}", jump_from=b))
        for table, chain, spec in mangle_node_rules(zt_veth, zt_ip, host_ip):
            ipt_rules.append(IptRule(nns, table, chain, spec, ref="§1.5"))
        rules += [Rule(nns, istio.RULE_PRIO_SKIP, fwmark=istio.SKIP_MARK, fwmask=istio.SKIP_MARK, goto=istio.RULE_PRIO_MAIN),
                  Rule(nns, istio.RULE_PRIO_OUTBOUND, table=istio.ROUTE_TABLE_OUTBOUND, fwmark=istio.OUTBOUND_MARK,
                       fwmask=istio.OUTBOUND_MARK),
                  Rule(nns, istio.RULE_PRIO_PROXY, table=istio.ROUTE_TABLE_PROXY, fwmark=istio.PROXY_RET_MARK,
                       fwmask=istio.PROXY_RET_MARK),
                  Rule(nns, istio.RULE_PRIO_INBOUND, table=istio.ROUTE_TABLE_INBOUND)]
        for t in (istio.ROUTE_TABLE_INBOUND, istio.ROUTE_TABLE_OUTBOUND, istio.ROUTE_TABLE_PROXY):
            routes.append(Route(nns, f"{zt_ip}/32", dev=zt_veth, table=t, scope="link"))
        routes.append(Route(nns, "0.0.0.0/0", dev=zt_veth, gateway=zt_ip, table=istio.ROUTE_TABLE_PROXY, onlink=True))
        for key in ("all", "default", zt_veth):
            sysctls.append(Sysctl(nns, f"net.ipv4.conf.{key}.rp_filter", "0"))
        sysctls.append(Sysctl(nns, f"net.ipv4.conf.{zt_veth}.accept_local", "1"))
        # §2 inside the ztunnel netns
        for spec in ztunnel_ns_rules(zt_ip):
            ipt_rules.append(IptRule(zt_ns, "mangle", "PREROUTING", spec, ref="§2.2"))
        rules += [Rule(zt_ns, istio.ZT_RULE_PRIO_TPROXY, table=100, fwmark=istio.TPROXY_MARK, fwmask=istio.TPROXY_MASK),
                  Rule(zt_ns, istio.ZT_RULE_PRIO_ORG_SRC_RET, table=100, fwmark=istio.ORG_SRC_RET_MARK,
                       fwmask=istio.TPROXY_MASK)]
        routes.append(Route(zt_ns, "0.0.0.0/0", dev="lo", table=100, type="local"))
        if nodes >= 2:  # §6 sidecar pod
            sc = f"{lab}-n2-p0"
            for c in ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"):
                chains.append(IptChain(sc, "nat", c))
            for chain, spec in SIDECAR_NAT:
                ipt_rules.append(IptRule(sc, "nat", chain, spec, ref="§6"))
    return Plan(lab=lab, topology="sample", source="netlab.kernel.sample", tunnel="userspace",
                nodes=tuple(node_infos), pods=tuple(pod_infos), services=(), netns=tuple(ns_), links=tuple(links),
                addresses=tuple(addrs), routes=tuple(routes), rules=tuple(rules), sysctls=tuple(sysctls),
                ipsets=tuple(ipsets), ipset_entries=tuple(entries), ipt_chains=tuple(chains),
                ipt_rules=tuple(ipt_rules), files=tuple(file_objs))


def single_node(lab: str, pods: int) -> Plan:
    """The benchmark shape: fabric + one node + ``pods`` pods with one veth each."""
    return build(lab, nodes=1, pods_per_node=pods)
