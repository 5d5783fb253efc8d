"""Istio 1.18.2 ambient redirection (istio-cni ``redirectMode: iptables``) as plan values.

Pure functions: topology facts in, ``netlab.plan.types`` values out, no root and no kernel.
Each function follows one section of ``shared/reference/istio-1.18-datapath.md``:

* :func:`node_objects` -- §1 (node netns) plus §3 (per-pod enrollment on that node);
* :func:`ztunnel_objects` -- §2 (inside the ztunnel pod's netns).

Every ``IptRule.spec`` is spelled exactly as ``iptables-legacy-save`` prints it (checked by
installing each rule with iptables-legacy in a scratch netns), because the verification compares
live save output with the plan text for text. The order of the returned lists is the order in
which istio-cni creates things (§1.9); the apply stage groups them by ``Plan.SECTIONS`` and keeps
the list order inside a section, so the order of rules inside one chain is what matters.

Rule ``ref`` strings are written out literally (``"§1.5 mangle <chain> #<n>"``) so that
``grep -rn "ztunnel-PREROUTING #<n>" netlab/`` lands on the line that builds rule n.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from netlab import istio
from netlab.istio import GENEVE_IPV4_OVERHEAD, mark
from netlab.plan.types import (
    Address,
    IpSet,
    IpSetEntry,
    IptChain,
    IptRule,
    Link,
    PodInfo,
    Process,
    Route,
    Rule,
    Sysctl,
)

Tunnel = Literal["kernel", "userspace"]

#: The userspace Geneve program (another module) used where the kernel has no geneve driver.
GENEVE_ENCAP_MODULE = "netlab.geneve.encap"

#: Namespace for :func:`pod_uid`: a fixed, project-specific UUID so UIDs are stable across runs.
_POD_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://istio.io/netlab/pod-uid")

#: MTU of the veth the tunnel's outer packets leave by (ZT_VETH / the ztunnel's eth0; veth default).
UNDERLAY_MTU = 1500

#: What a kernel geneve device would get (underlay MTU - 50, KGEN); a TAP must be told explicitly.
TAP_MTU = UNDERLAY_MTU - GENEVE_IPV4_OVERHEAD

_ALL = "0.0.0.0/0"


def is_enrolled(pod: PodInfo) -> bool:
    """Whether istio-cni would enroll ``pod`` (§3): only ambient-mode application pods.

    ztunnel and waypoint pods carry ``ambient.istio.io/redirection: disabled``, sidecar pods carry
    ``sidecar.istio.io/status``, plain pods live in namespaces without the dataplane-mode label;
    the topology has already folded those three conditions into ``mode``.
    """
    return pod.mode == "ambient"


def pod_uid(pod: PodInfo) -> str:
    """A stand-in for the Kubernetes pod UID (the ipset entry comment, §1.4/§3).

    There is no API server, so the UID is derived: uuid5 of ``<namespace>/<name>``. Deterministic,
    so identical topologies give identical plans, and unique per pod within a lab.
    """
    return str(uuid.uuid5(_POD_UID_NAMESPACE, f"{pod.namespace}/{pod.name}"))


def _ipt(netns: str, table: Literal["mangle", "nat"], chain: str, ref: str, spec: str) -> IptRule:
    """One rule; refuses a ``ref`` that does not name the table and chain it is appended to,
    so a grep for the ref can never land on a rule that lives somewhere else."""
    if f" {table} {chain} #" not in ref:
        raise AssertionError(f"ref {ref!r} does not match {table} {chain}")
    return IptRule(netns=netns, table=table, chain=chain, spec=spec, ref=ref)


def _set_mark(v: int) -> str:
    """istio-cni writes ``-j MARK --set-mark V/V``; iptables-save prints ``--set-xmark V/V``."""
    return f"-j MARK --set-xmark {mark(v)}"


def _save_connmark(v: int) -> str:
    return f"-m mark --mark {mark(v)} -j CONNMARK --save-mark --nfmask {v:#x} --ctmask {v:#x}"


def _check_ipv4(ip: str, what: str) -> str:
    """1.18 ambient iptables mode is IPv4-only (``To4()``); an IPv6 input is a topology error here."""
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise ValueError(f"{what}: {ip!r} is not an IPv4 address (Istio 1.18 ambient redirection is IPv4-only)") from None


def _tunnel_devices(
    netns: str, proc_name: str, devs: Sequence[tuple[str, int, str, int]], remote: str, tunnel: Tunnel
) -> list[Any]:
    """Geneve devices ``(name, vni, address, prefixlen)`` toward ``remote`` (§1.3 / §2.1).

    Kernel mode: real geneve devices (dstport default 6081). istio-cni gives no MTU and the kernel
    derives underlay - 50 = 1450 from the route to ``remote``, which in a cluster already exists;
    the lab creates devices before routes, so it states that derived 1450 itself (deviations.md).
    Userspace mode: TAP devices with the same names, addresses and MTU, plus one encapsulation
    process per netns that speaks Geneve over UDP 6081 to ``remote`` for each of them.
    """
    out: list[Any] = []
    for name, vni, _ip, _plen in devs:
        if tunnel == "kernel":
            out.append(Link(netns=netns, name=name, kind="geneve", vni=vni, remote=remote, mtu=TAP_MTU))
        else:
            out.append(Link(netns=netns, name=name, kind="tap", vni=vni, remote=remote, mtu=TAP_MTU))
    for name, _vni, ip, plen in devs:
        out.append(Address(netns=netns, dev=name, ip=ip, prefixlen=plen))
    if tunnel == "userspace":
        argv: list[str] = [GENEVE_ENCAP_MODULE, "--netns", netns]
        for name, vni, _ip, _plen in devs:
            argv += ["--tunnel", f"{name}:{vni}:{remote}"]
        out.append(Process(name=proc_name, netns=netns, kind="geneve", argv=tuple(argv)))
    elif tunnel != "kernel":
        raise ValueError(f"tunnel must be 'kernel' or 'userspace', not {tunnel!r}")
    return out


def _sysctl(netns: str, dev: str, knob: str, value: int) -> Sysctl:
    return Sysctl(netns=netns, key_name=f"net.ipv4.conf.{dev}.{knob}", value=str(value))


def node_iptables(node_netns: str, zt_ip: str, zt_veth: str, host_ip: str) -> list[Any]:
    """§1.5: chains (jumps inserted at position 1), then every rule in istio-cni order.

    The nat DNS-capture DNAT (nat ztunnel-PREROUTING #2) is deliberately absent: it is only added
    when ztunnel has ``ISTIO_META_DNS_CAPTURE=true``, and ztunnel 1.18 has no 15053 listener (§9).
    No filter-table rule exists in 1.18.
    """
    ns = node_netns
    PRE, POST = istio.CHAIN_ZT_PREROUTING, istio.CHAIN_ZT_POSTROUTING
    OUT, INP, FWD = istio.CHAIN_ZT_OUTPUT, istio.CHAIN_ZT_INPUT, istio.CHAIN_ZT_FORWARD
    tin, tout = istio.INBOUND_TUN, istio.OUTBOUND_TUN
    skip, connskip, proxy = istio.SKIP_MARK, istio.CONN_SKIP_MARK, istio.PROXY_MARK
    ret, outbound = istio.PROXY_RET_MARK, istio.OUTBOUND_MARK
    pods = istio.ZTUNNEL_PODS_IPSET
    return [
        IptChain(netns=ns, table="mangle", chain=PRE, jump_from="PREROUTING"),
        IptChain(netns=ns, table="mangle", chain=POST, jump_from="POSTROUTING"),
        IptChain(netns=ns, table="mangle", chain=OUT, jump_from="OUTPUT"),
        IptChain(netns=ns, table="mangle", chain=INP, jump_from="INPUT"),
        IptChain(netns=ns, table="mangle", chain=FWD, jump_from="FORWARD"),
        IptChain(netns=ns, table="nat", chain=PRE, jump_from="PREROUTING"),
        IptChain(netns=ns, table="nat", chain=POST, jump_from="POSTROUTING"),
        # mangle ztunnel-PREROUTING, in order
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #1", f"-i {tin} {_set_mark(skip)}"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #2", f"-i {tin} -j RETURN"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #3", f"-i {tout} {_set_mark(skip)}"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #4", f"-i {tout} -j RETURN"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #5",
             f"-p udp -m udp --dport {istio.GENEVE_DST_PORT} -j RETURN"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #6",
             f"-m connmark --mark {mark(connskip)} {_set_mark(skip)}"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #7", f"-m mark --mark {mark(skip)} -j RETURN"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #8",
             f"! -i {zt_veth} -m connmark --mark {mark(proxy)} {_set_mark(ret)}"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #9", f"-m mark --mark {mark(ret)} -j RETURN"),
        # save form puts the address match before the interface: "! -s ZT_IP/32 -i ZT_VETH"
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #10",
             f"! -s {zt_ip}/32 -i {zt_veth} {_set_mark(proxy)}"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #11", f"-m mark --mark {mark(skip)} -j RETURN"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #12", f"-i {zt_veth} {_set_mark(connskip)}"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #13", f"-p udp {_set_mark(connskip)}"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #14", f"-m mark --mark {mark(skip)} -j RETURN"),
        _ipt(ns, "mangle", PRE, "§1.5 mangle ztunnel-PREROUTING #15",
             f"-p tcp -m set --match-set {pods} src {_set_mark(outbound)}"),
        # other mangle chains
        _ipt(ns, "mangle", FWD, "§1.5 mangle ztunnel-FORWARD #1", _save_connmark(connskip)),
        _ipt(ns, "mangle", FWD, "§1.5 mangle ztunnel-FORWARD #2", _save_connmark(proxy)),
        _ipt(ns, "mangle", INP, "§1.5 mangle ztunnel-INPUT #1", _save_connmark(connskip)),
        _ipt(ns, "mangle", INP, "§1.5 mangle ztunnel-INPUT #2", _save_connmark(proxy)),
        _ipt(ns, "mangle", OUT, "§1.5 mangle ztunnel-OUTPUT #1",
             f"-s {host_ip}/32 -j MARK --set-xmark {istio.OUTPUT_SKIP_MARK:#x}/{istio.FULL_MASK:#x}"),
        # nat: #2 (DNS capture DNAT) left out, see docstring
        _ipt(ns, "nat", PRE, "§1.5 nat ztunnel-PREROUTING #1", f"-m mark --mark {mark(outbound)} -j ACCEPT"),
        _ipt(ns, "nat", POST, "§1.5 nat ztunnel-POSTROUTING #1", f"-m mark --mark {mark(outbound)} -j ACCEPT"),
    ]


def enrollment_objects(node_netns: str, host_ip: str, pod: PodInfo) -> list[Any]:
    """§3: what enrolling one pod adds on its node (ipset entry, table-100 route, rp_filter).

    Nothing is added inside the pod's netns and nothing to tables 101/102 (§3).
    """
    if not is_enrolled(pod):
        raise ValueError(f"pod {pod.ref} (mode {pod.mode}) is not an ambient pod; istio-cni would not enroll it")
    ip = _check_ipv4(pod.ip, f"pod {pod.ref}")
    return [
        IpSetEntry(netns=node_netns, set=istio.ZTUNNEL_PODS_IPSET, ip=ip, comment=pod_uid(pod)),
        Route(netns=node_netns, dst=f"{ip}/32", gateway=istio.ZTUNNEL_INBOUND_TUN_IP, dev=istio.INBOUND_TUN,
              table=istio.ROUTE_TABLE_INBOUND, src=host_ip),
        _sysctl(node_netns, pod.host_veth, "rp_filter", 0),
    ]


def node_objects(
    node_netns: str, node_name: str, host_ip: str, zt: PodInfo, enrolled: Sequence[PodInfo], tunnel: Tunnel
) -> list[Any]:
    """§1 on one node whose active ztunnel is ``zt``, plus §3 for each pod in ``enrolled``.

    ZT_IP = ``zt.ip``, ZT_VETH = ``zt.host_veth``, HOST_IP = ``host_ip``. Enrolled pods are
    emitted in ascending IP order so the plan does not depend on the caller's ordering.
    """
    zt_ip = _check_ipv4(zt.ip, f"ztunnel {zt.ref}")
    host_ip = _check_ipv4(host_ip, f"node {node_name} HOST_IP")
    zt_veth = zt.host_veth
    if zt.node != node_name:
        raise ValueError(f"ztunnel {zt.ref} runs on {zt.node}, not on {node_name}")
    ns = node_netns
    tin, tout = istio.INBOUND_TUN, istio.OUTBOUND_TUN
    objs: list[Any] = []
    # istio-cni order (§1.9): chains + rules, ipset, sysctls, geneve devs, tunnel sysctls, routes, ip rules
    objs.append(IpSet(netns=ns, name=istio.ZTUNNEL_PODS_IPSET, type="hash:ip", comment=True))
    objs += node_iptables(ns, zt_ip, zt_veth, host_ip)
    objs += [
        _sysctl(ns, "default", "rp_filter", 0),
        _sysctl(ns, "all", "rp_filter", 0),
        _sysctl(ns, zt_veth, "rp_filter", 0),
        _sysctl(ns, zt_veth, "accept_local", 1),
    ]
    objs += _tunnel_devices(ns, f"geneve-{node_name}", [
        (tin, istio.INBOUND_TUN_VNI, istio.INBOUND_TUN_IP, istio.TUN_PREFIX_LEN),
        (tout, istio.OUTBOUND_TUN_VNI, istio.OUTBOUND_TUN_IP, istio.TUN_PREFIX_LEN),
    ], zt_ip, tunnel)
    objs += [
        _sysctl(ns, tin, "rp_filter", 0),
        _sysctl(ns, tin, "accept_local", 1),
        _sysctl(ns, tout, "rp_filter", 0),
        _sysctl(ns, tout, "accept_local", 1),
    ]
    zt_host = f"{zt_ip}/32"
    objs += [  # §1.7, tables 101, 102, 100 in istio-cni's order
        Route(netns=ns, dst=zt_host, dev=zt_veth, table=istio.ROUTE_TABLE_OUTBOUND, scope="link"),
        Route(netns=ns, dst=_ALL, gateway=istio.ZTUNNEL_OUTBOUND_TUN_IP, dev=tout, table=istio.ROUTE_TABLE_OUTBOUND),
        Route(netns=ns, dst=zt_host, dev=zt_veth, table=istio.ROUTE_TABLE_PROXY, scope="link"),
        Route(netns=ns, dst=_ALL, gateway=zt_ip, dev=zt_veth, table=istio.ROUTE_TABLE_PROXY, onlink=True),
        Route(netns=ns, dst=zt_host, dev=zt_veth, table=istio.ROUTE_TABLE_INBOUND, scope="link"),
    ]
    objs += [  # §1.6
        Rule(netns=ns, priority=istio.RULE_PRIO_SKIP, fwmark=istio.SKIP_MARK, fwmask=istio.SKIP_MARK,
             goto=istio.RULE_PRIO_MAIN),
        Rule(netns=ns, priority=istio.RULE_PRIO_OUTBOUND, fwmark=istio.OUTBOUND_MARK, fwmask=istio.OUTBOUND_MARK,
             table=istio.ROUTE_TABLE_OUTBOUND),
        Rule(netns=ns, priority=istio.RULE_PRIO_PROXY, fwmark=istio.PROXY_RET_MARK, fwmask=istio.PROXY_RET_MARK,
             table=istio.ROUTE_TABLE_PROXY),
        Rule(netns=ns, priority=istio.RULE_PRIO_INBOUND, table=istio.ROUTE_TABLE_INBOUND),
    ]
    seen: dict[str, str] = {}
    for pod in sorted(enrolled, key=lambda p: ipaddress.IPv4Address(_check_ipv4(p.ip, f"pod {p.ref}"))):
        if pod.ip in seen:
            raise ValueError(f"pods {seen[pod.ip]} and {pod.ref} share IP {pod.ip}")
        if pod.node != node_name:
            raise ValueError(f"pod {pod.ref} runs on {pod.node}; it cannot be enrolled on {node_name}")
        seen[pod.ip] = pod.ref
        objs += enrollment_objects(ns, host_ip, pod)
    # Processes go last in the apply order anyway; keep the encap process at the end of the list.
    objs.sort(key=lambda o: isinstance(o, Process))
    return objs


def ztunnel_objects(zt_netns: str, node_name: str, zt: PodInfo, host_ip_br: str, tunnel: Tunnel) -> list[Any]:
    """§2: what istio-cni sets up inside the ztunnel pod's netns (there is no init container).

    ``host_ip_br`` is HOST_IP_BR, the node's source address toward ZT_IP and so the geneve remote
    on this side. POD_IF is the ztunnel pod's ``eth0``. The ``-F mangle PREROUTING`` / ``-F nat
    OUTPUT`` istio-cni does first are no-ops on the lab's fresh netns and have no plan value.
    """
    zt_ip = _check_ipv4(zt.ip, f"ztunnel {zt.ref}")
    br = _check_ipv4(host_ip_br, f"node {node_name} HOST_IP_BR")
    ns, pod_if = zt_netns, istio.ZT_POD_IF
    pin, pout = "p" + istio.INBOUND_TUN, "p" + istio.OUTBOUND_TUN
    assert (pin, pout) == (istio.INBOUND_TUN_POD, istio.OUTBOUND_TUN_POD)
    tproxy = f"--on-ip {istio.TPROXY_ON_IP} --tproxy-mark {istio.TPROXY_MARK:#x}/{istio.TPROXY_MASK:#x}"
    objs: list[Any] = _tunnel_devices(ns, f"geneve-ztunnel-{node_name}", [
        (pin, istio.INBOUND_TUN_VNI, istio.ZTUNNEL_INBOUND_TUN_IP, istio.TUN_PREFIX_LEN),
        (pout, istio.OUTBOUND_TUN_VNI, istio.ZTUNNEL_OUTBOUND_TUN_IP, istio.TUN_PREFIX_LEN),
    ], br, tunnel)
    objs += [_sysctl(ns, pout, "rp_filter", 0), _sysctl(ns, pin, "rp_filter", 0)]
    objs += [  # §2.3
        Rule(netns=ns, priority=istio.ZT_RULE_PRIO_TPROXY, fwmark=istio.TPROXY_MARK, fwmask=istio.TPROXY_MASK,
             table=istio.ROUTE_TABLE_INBOUND),
        Rule(netns=ns, priority=istio.ZT_RULE_PRIO_ORG_SRC_RET, fwmark=istio.ORG_SRC_RET_MARK,
             fwmask=istio.ORG_SRC_RET_MASK, table=istio.ROUTE_TABLE_INBOUND),
        Route(netns=ns, dst=_ALL, dev="lo", table=istio.ROUTE_TABLE_INBOUND, scope="host", type="local"),
        Route(netns=ns, dst=_ALL, gateway=istio.OUTBOUND_TUN_IP, dev=pout, table=istio.ROUTE_TABLE_OUTBOUND),
        Route(netns=ns, dst=_ALL, gateway=istio.INBOUND_TUN_IP, dev=pin, table=istio.ROUTE_TABLE_PROXY),
        Route(netns=ns, dst=f"{br}/32", dev=pod_if, table=istio.ROUTE_TABLE_OUTBOUND, scope="link"),
        Route(netns=ns, dst=f"{br}/32", dev=pod_if, table=istio.ROUTE_TABLE_PROXY, scope="link"),
    ]
    objs += [  # §2.2, mangle PREROUTING in order; save form puts "-i" before "-p" and "! -d" first
        _ipt(ns, "mangle", "PREROUTING", "§2.2 mangle PREROUTING #1",
             f"-i {pin} -p tcp -m tcp --dport {istio.HBONE_PORT} -j TPROXY --on-port {istio.HBONE_PORT} {tproxy}"),
        _ipt(ns, "mangle", "PREROUTING", "§2.2 mangle PREROUTING #2",
             f"-i {pout} -p tcp -j TPROXY --on-port {istio.ZTUNNEL_OUTBOUND_PORT} {tproxy}"),
        _ipt(ns, "mangle", "PREROUTING", "§2.2 mangle PREROUTING #3",
             f"-i {pin} -p tcp -j TPROXY --on-port {istio.ZTUNNEL_INBOUND_PLAINTEXT_PORT} {tproxy}"),
        _ipt(ns, "mangle", "PREROUTING", "§2.2 mangle PREROUTING #4",
             f"! -d {zt_ip}/32 -i {pod_if} -p tcp -j MARK --set-xmark "
             f"{istio.ORG_SRC_RET_MARK:#x}/{istio.ORG_SRC_RET_MASK:#x}"),
    ]
    objs += [  # §2.4 (disableRPFiltersForLink on POD_IF also writes all/default)
        _sysctl(ns, "default", "rp_filter", 0),
        _sysctl(ns, "all", "rp_filter", 0),
        _sysctl(ns, pod_if, "rp_filter", 0),
    ]
    objs.sort(key=lambda o: isinstance(o, Process))
    return objs
