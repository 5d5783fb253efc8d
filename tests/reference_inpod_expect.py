"""Expected kernel state of the in-pod datapath (Istio 1.30.3), written BY HAND from
shared/reference/istio-inpod-datapath.md (§1.5, §1.6, §1.8, §2.1, §2.2, §4.2).

The counterpart of tests/reference_expect.py (1.18): nothing here calls netlab code. The texts are
typed out from the reference's listings in the spelling ``iptables-legacy-save``, ``ip rule show``
and ``ip route show`` print (§1.5 says how that differs from the goldens, which are restore
input: ``/32`` on addresses, ``-m tcp`` before ``--dport``, ``--to-ports``). No upstream file is
copied. The normalisers of tests/reference_expect.py turn live output into the same forms.

The lab installs what the chart's ``ambient.ipv6=false`` installs (IPv4 only; docs/deviations.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tests.reference_expect import EMPTY_FILTER_SAVE, EMPTY_NAT_SAVE  # (the same empty tables as 1.18's)

EMPTY_MANGLE_SAVE = """\
*mangle
:PREROUTING ACCEPT
:INPUT ACCEPT
:FORWARD ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
COMMIT
"""

EMPTY_RAW_SAVE = """\
*raw
:PREROUTING ACCEPT
:OUTPUT ACCEPT
COMMIT
"""

def pod_mangle_save() -> str:
    """§1.5 mangle (the same with DNS capture on or off, and with bypass-inbound-capture, §1.8)."""
    return """\
*mangle
:PREROUTING ACCEPT
:INPUT ACCEPT
:FORWARD ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:ISTIO_OUTPUT -
:ISTIO_PRERT -
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
"""


def pod_nat_save(dns: bool = True, bypass_inbound: bool = False) -> str:
    """§1.5 nat; without DNS capture OUT #2/#3 are absent (§1.4); with bypass-inbound-capture
    PRE #1/#2 are (§1.8): the chain and its jump stay."""
    out = [
        "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
    ]
    if dns:
        out += [
            "-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
        ]
    out += [
        "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
    ]
    pre = [] if bypass_inbound else [
        "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
    ]
    head = """\
*nat
:PREROUTING ACCEPT
:INPUT ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:ISTIO_OUTPUT -
:ISTIO_PRERT -
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
"""
    return head + "\n".join(out + pre) + "\nCOMMIT\n"


def pod_raw_save(dns: bool = True) -> str:
    """§1.5 raw: the CT zone 1 rules with DNS capture; untouched without (§1.4)."""
    if not dns:
        return EMPTY_RAW_SAVE
    return """\
*raw
:PREROUTING ACCEPT
:OUTPUT ACCEPT
:ISTIO_OUTPUT -
:ISTIO_PRERT -
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1
-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1
COMMIT
"""


def pod_save(dns: bool = True, bypass_inbound: bool = False) -> dict[str, str]:
    """Every table of an enrolled pod's netns; the filter table is never touched (§1.3)."""
    return {"mangle": pod_mangle_save(), "nat": pod_nat_save(dns, bypass_inbound), "raw": pod_raw_save(dns),
            "filter": EMPTY_FILTER_SAVE}


def pod_ip_rules() -> list[str]:
    """§1.6 plus the kernel's three default rules."""
    return [
        "0:\tfrom all lookup local",
        "32764:\tfrom all fwmark 0x111/0xfff lookup 100",
        "32766:\tfrom all lookup main",
        "32767:\tfrom all lookup default",
    ]


def pod_routes() -> dict[int, list[str]]:
    """§1.6 table 100 (v4; ``ip -4 route show table 100``)."""
    return {100: ["local default dev lo scope host"]}


def node_nat_save() -> str:
    """§2.1 nat on a node (after the lab's KUBE-* chains are dropped): ISTIO_POSTRT at position 1
    of POSTROUTING and its one rule, in save form."""
    return """\
*nat
:PREROUTING ACCEPT
:INPUT ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:ISTIO_POSTRT -
-A POSTROUTING -j ISTIO_POSTRT
-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127
COMMIT
"""


def node_save() -> dict[str, str]:
    """§2.1/§2.2: nothing in mangle, raw or filter on a node (no node marks, no ztunnel-* chains)."""
    return {"mangle": EMPTY_MANGLE_SAVE, "nat": node_nat_save(), "raw": EMPTY_RAW_SAVE, "filter": EMPTY_FILTER_SAVE}


def node_ip_rules() -> list[str]:
    """§2.2: no ip rules on a node: the kernel's three."""
    return ["0:\tfrom all lookup local", "32766:\tfrom all lookup main", "32767:\tfrom all lookup default"]


PROBE_IPSET = "istio-inpod-probes-v4"
PROBE_IPSET_TYPE = "hash:ip"


def probe_ipset_members(enrolled_ips: Iterable[str]) -> list[str]:
    """§2.1: the enrolled pods *of this node*; each entry's comment is the pod UID."""
    return sorted(enrolled_ips, key=ipaddress.IPv4Address)


#: §2.2: what 1.18 put on a node and the in-pod datapath must not have.
ABSENT_DEVICES = ("istioin", "istioout", "pistioin", "pistioout")
ABSENT_IPSET = "ztunnel-pods-ips"
ABSENT_TABLES = (100, 101, 102)  # on nodes (a pod's table 100 is its own, §1.6)
ABSENT_RULE_PRIOS = (100, 101, 102, 103, 20000, 20003)


def ztunnel_save() -> dict[str, str]:
    """§2.2/§6.1: the ztunnel pod's netns is untouched (no TPROXY)."""
    return {"mangle": EMPTY_MANGLE_SAVE, "nat": EMPTY_NAT_SAVE, "raw": EMPTY_RAW_SAVE, "filter": EMPTY_FILTER_SAVE}


def sidecar_cni_nat_save() -> str:
    """§4.2: istio-cni's CNI-plugin ruleset in a sidecar pod, as iptables-legacy-save prints it
    (user chains sorted by name, built-in chains' rules first)."""
    return """\
*nat
:PREROUTING ACCEPT
:INPUT ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:ISTIO_INBOUND -
:ISTIO_IN_REDIRECT -
:ISTIO_OUTPUT -
:ISTIO_REDIRECT -
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_OUTPUT -p udp -m udp --dport 15020 -j RETURN
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
