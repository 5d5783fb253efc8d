"""Istio 1.30.3 in-pod redirection (istio-cni's node agent, iptables backend) as plan values.

The in-pod counterpart of :mod:`netlab.plan.ambient`: pure functions, topology facts in,
``netlab.plan.types`` values out. Each follows one section of
``shared/reference/istio-inpod-datapath.md`` (the "inpod reference"):

* :func:`pod_objects` -- §1.2-§1.6, inside one enrolled pod's netns (``CreateInpodRules``);
* :func:`node_objects` -- §2.1, the node's host-probe SNAT and its ipset (``AppendHostRules``);
* the sidecar pods' CNI-plugin ruleset of §4.2 is :func:`netlab.plan.sidecar.cni_plugin_objects`.

Nothing of 1.18's node objects exists here (§2.2): no Geneve devices, no ``ztunnel-pods-ips``,
no node marks, ip rules or tables, nothing in the ztunnel pod's netns.

Every ``IptRule.spec`` is the ``iptables-legacy-save`` spelling of §1.5 (the goldens are restore
input; §1.4 says how their spelling differs). ``ref`` names the reference row the rule comes
from, ``§1.4 <table> <chain> #<row>``, so ``grep -rn "nat ISTIO_OUTPUT #6" netlab/`` lands here,
and ``grep -rn "ztunnel-PREROUTING #15"`` on the 1.18 counterpart in plan/ambient.py. The row
number is the reference's (DNS capture on); with DNS capture off rows #2 and #3 are absent, so
in the live chain #4-#6 stand at positions 2-4 (§1.4), under their reference numbers still.

IPv4 only: the lab's pods have IPv4 addresses only, so it installs what the chart's
``ambient.ipv6=false`` installs (no ip6tables rules, no v6 ip rule, no ``local ::/0`` route, no
``-v6`` ipset; docs/deviations.md, "inpod"). With the chart default (``ambient.ipv6=true``) a
v4-only cluster also gets the same rules in ip6tables.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from netlab import istio
from netlab.plan.ambient import pod_uid
from netlab.plan.types import IpSet, IpSetEntry, IptChain, IptRule, PodInfo, Route, Rule

Table = Literal["mangle", "nat", "raw"]

_ALL = "0.0.0.0/0"
_LOCALHOST = "127.0.0.1/32"


def _ipt(netns: str, table: Table, chain: str, ref: str, spec: str) -> IptRule:
    """One rule; its ``ref`` must name the table and chain it is appended to (see the module doc)."""
    if f" {table} {chain} #" not in ref:
        raise AssertionError(f"ref {ref!r} does not match {table} {chain}")
    return IptRule(netns=netns, table=table, chain=chain, spec=spec, ref=ref)


def _mark(value: int, mask: int) -> str:
    return f"{value:#x}/{mask:#x}"


def is_enrolled(pod: PodInfo) -> bool:
    """§2.3: istio-cni enrolls a pod whose enablement selector matches, that has no sidecar and
    is no ztunnel pod. The topology has folded the selectors (pod label ``istio.io/dataplane-mode``,
    namespace label, ``none``) into ``mode``, so: the ambient pods."""
    return pod.mode == "ambient"


def annotation_flag(annotations: Mapping[str, str], key: str, default: bool) -> bool:
    """A pod annotation istio-cni reads as a boolean (``"true"``/``"false"``, NA net.go L27-58);
    anything else leaves the install-wide default."""
    v = annotations.get(key)
    return default if v not in ("true", "false") else v == "true"


def pod_objects(pod: PodInfo, *, dns_capture: bool = True, bypass_inbound: bool = False) -> list[Any]:
    """§1.2-§1.6 inside ``pod``'s netns, in ``CreateInpodRules`` order: the table-100 route, the
    ip rule, then the iptables rules (jumps in the emit order of §1.3, then each chain's rules
    in order).

    ``dns_capture``: the chart's ``ambient.dnsCapture`` or the pod's ``ambient.istio.io/dns-capture``
    annotation (§1.8): without it there is no raw table and no nat ISTIO_OUTPUT #2/#3.
    ``bypass_inbound``: the annotation ``ambient.istio.io/bypass-inbound-capture: "true"``
    (§1.8, ``ingress.golden``): nat ISTIO_PRERT #1-#2 are left out, the mangle CONNMARK stays.
    """
    if not is_enrolled(pod):
        raise ValueError(f"pod {pod.ref} (mode {pod.mode}) is not an ambient pod; istio-cni would not enroll it")
    ipaddress.IPv4Address(pod.ip)  # the lab's pods are IPv4 (module docstring)
    ns = pod.netns
    PRE, OUT = istio.CHAIN_ISTIO_PRERT, istio.CHAIN_ISTIO_OUTPUT
    mark = _mark(istio.INPOD_MARK, istio.INPOD_MASK)
    tproxy = _mark(istio.INPOD_TPROXY_MARK, istio.INPOD_TPROXY_MASK)
    probe = f"{istio.HOST_PROBE_SNAT_IP}/32"
    restore = f"{istio.INPOD_RESTORE_MASK:#x}"
    objs: list[Any] = [
        # §1.2 step 1: netlink RouteReplace, scope host (IPT-NL L96-144)
        Route(netns=ns, dst=_ALL, dev="lo", table=istio.INPOD_ROUTE_TABLE, scope="host", type="local"),
        # §1.2 step 2 / §1.6 (IPT-NL L32-76)
        Rule(netns=ns, priority=istio.INPOD_RULE_PRIO, fwmark=istio.INPOD_TPROXY_MARK, fwmask=istio.INPOD_TPROXY_MASK,
             table=istio.INPOD_ROUTE_TABLE),
        # §1.3 jumps, appended (rule 1 of each built-in chain of a fresh netns), in emit order
        IptChain(netns=ns, table="mangle", chain=PRE, jump_from="PREROUTING"),  # §1.3 #1
        IptChain(netns=ns, table="mangle", chain=OUT, jump_from="OUTPUT"),  # §1.3 #2
        IptChain(netns=ns, table="nat", chain=OUT, jump_from="OUTPUT"),  # §1.3 #3
    ]
    if dns_capture:
        objs += [IptChain(netns=ns, table="raw", chain=PRE, jump_from="PREROUTING"),  # §1.3 #4
                 IptChain(netns=ns, table="raw", chain=OUT, jump_from="OUTPUT")]  # §1.3 #5
    objs.append(IptChain(netns=ns, table="nat", chain=PRE, jump_from="PREROUTING"))  # §1.3 #6
    objs += [
        _ipt(ns, "mangle", PRE, "§1.4 mangle ISTIO_PRERT #1", f"-m mark --mark {mark} -j CONNMARK --set-xmark {tproxy}"),
        _ipt(ns, "mangle", OUT, "§1.4 mangle ISTIO_OUTPUT #1",
             f"-m connmark --mark {tproxy} -j CONNMARK --restore-mark --nfmask {restore} --ctmask {restore}"),
    ]
    if not bypass_inbound:
        objs += [
            _ipt(ns, "nat", PRE, "§1.4 nat ISTIO_PRERT #1", f"-s {probe} -p tcp -m tcp -j ACCEPT"),
            _ipt(ns, "nat", PRE, "§1.4 nat ISTIO_PRERT #2",
                 f"! -d {_LOCALHOST} -p tcp -m tcp ! --dport {istio.HBONE_PORT} -m mark ! --mark {mark} "
                 f"-j REDIRECT --to-ports {istio.ZTUNNEL_INBOUND_PLAINTEXT_PORT}"),
        ]
    objs.append(_ipt(ns, "nat", OUT, "§1.4 nat ISTIO_OUTPUT #1", f"-d {probe} -p tcp -m tcp -j ACCEPT"))
    if dns_capture:
        objs += [
            _ipt(ns, "nat", OUT, "§1.4 nat ISTIO_OUTPUT #2",
                 f"! -o lo -p udp -m mark ! --mark {mark} -m udp --dport {istio.DNS_PORT} "
                 f"-j REDIRECT --to-ports {istio.ZTUNNEL_DNS_PORT}"),
            _ipt(ns, "nat", OUT, "§1.4 nat ISTIO_OUTPUT #3",
                 f"! -d {_LOCALHOST} -p tcp -m tcp --dport {istio.DNS_PORT} -m mark ! --mark {mark} "
                 f"-j REDIRECT --to-ports {istio.ZTUNNEL_DNS_PORT}"),
        ]
    objs += [
        _ipt(ns, "nat", OUT, "§1.4 nat ISTIO_OUTPUT #4", f"-p tcp -m mark --mark {tproxy} -j ACCEPT"),
        _ipt(ns, "nat", OUT, "§1.4 nat ISTIO_OUTPUT #5", f"! -d {_LOCALHOST} -o lo -j ACCEPT"),
        _ipt(ns, "nat", OUT, "§1.4 nat ISTIO_OUTPUT #6",
             f"! -d {_LOCALHOST} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports {istio.ZTUNNEL_OUTBOUND_PORT}"),
    ]
    if dns_capture:
        zone = f"-j CT --zone {istio.DNS_CT_ZONE}"
        objs += [
            _ipt(ns, "raw", OUT, "§1.4 raw ISTIO_OUTPUT #1", f"-p udp -m mark --mark {mark} -m udp --dport {istio.DNS_PORT} {zone}"),
            _ipt(ns, "raw", PRE, "§1.4 raw ISTIO_PRERT #1",
                 f"-p udp -m mark ! --mark {mark} -m udp --sport {istio.DNS_PORT} {zone}"),
        ]
    return objs


def node_objects(node_netns: str, node_name: str, enrolled: Sequence[PodInfo]) -> list[Any]:
    """§2.1 on one node: the ipset ``istio-inpod-probes-v4`` with the node's enrolled pods (comment:
    the pod UID), chain ``ISTIO_POSTRT`` inserted at position 1 of nat POSTROUTING (1.27+; the
    lab's kube-proxy stand-in has nothing there) and its one SNAT rule. Pods in ascending IP order,
    so the plan does not depend on the caller's."""
    ns = node_netns
    ipset = istio.INPOD_PROBES_IPSET_V4
    objs: list[Any] = [
        IpSet(netns=ns, name=ipset, type="hash:ip", comment=True),
        IptChain(netns=ns, table="nat", chain=istio.CHAIN_ISTIO_POSTRT, jump_from="POSTROUTING"),
        _ipt(ns, "nat", istio.CHAIN_ISTIO_POSTRT, "§2.1 nat ISTIO_POSTRT #1",
             f"-p tcp -m owner --socket-exists -m set --match-set {ipset} dst -j SNAT --to-source {istio.HOST_PROBE_SNAT_IP}"),
    ]
    seen: dict[str, str] = {}
    for pod in sorted(enrolled, key=lambda p: ipaddress.IPv4Address(p.ip)):
        if not is_enrolled(pod):
            raise ValueError(f"pod {pod.ref} (mode {pod.mode}) is not enrolled")
        if pod.node != node_name:
            raise ValueError(f"pod {pod.ref} runs on {pod.node}; it cannot be in {node_name}'s probe ipset")
        if pod.ip in seen:
            raise ValueError(f"pods {seen[pod.ip]} and {pod.ref} share IP {pod.ip}")
        seen[pod.ip] = pod.ref
        objs.append(IpSetEntry(netns=ns, set=ipset, ip=pod.ip, comment=pod_uid(pod)))
    return objs
