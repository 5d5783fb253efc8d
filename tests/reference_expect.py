"""Expected Istio 1.18.2 kernel state, written BY HAND from shared/reference/istio-1.18-datapath.md.

Nothing in the "expectations" half calls netlab code: the texts below are typed out from the
reference tables (§1.5-§1.8, §2.1-§2.4, §3, §6) in the spelling ``iptables-legacy-save``,
``ip rule show`` and ``ip route show`` print (verified by installing the rules in a scratch netns
with iptables-legacy 1.8.9). Only the inputs that differ per lab are parameters: ZT_IP, ZT_VETH,
HOST_IP (= HOST_IP_BR in the lab), the enrolled pod IPs and their host-side veths.

The second half holds *normalisers* (live command output -> comparable form) and *plan renderers*
(plan values -> the same form) used by the unit and kernel tests. They are kept apart from the
expectations on purpose: an expectation must never be derived from the code under test.

Normalised forms: save text = the lines from ``*table`` to ``COMMIT`` without ``#`` comment lines
and without ``[packets:bytes]`` counters; route lines = one ``ip -4 route show table N`` line
without trailing blanks and without the ``linkdown``/``dead`` state flags.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

# =====================================================================================
# Expectations (hand-written from the reference)
# =====================================================================================


def node_mangle_save(zt_ip: str, zt_veth: str, host_ip: str) -> str:
    """§1.5 mangle table on a node (jumps at position 1, rules in order)."""
    return f"""\
*mangle
:PREROUTING ACCEPT
:INPUT ACCEPT
:FORWARD ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:ztunnel-FORWARD -
:ztunnel-INPUT -
:ztunnel-OUTPUT -
:ztunnel-POSTROUTING -
:ztunnel-PREROUTING -
-A PREROUTING -j ztunnel-PREROUTING
-A INPUT -j ztunnel-INPUT
-A FORWARD -j ztunnel-FORWARD
-A OUTPUT -j ztunnel-OUTPUT
-A POSTROUTING -j ztunnel-POSTROUTING
-A ztunnel-FORWARD -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-FORWARD -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210
-A ztunnel-INPUT -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-INPUT -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210
-A ztunnel-OUTPUT -s {host_ip}/32 -j MARK --set-xmark 0x220/0xffffffff
-A ztunnel-PREROUTING -i istioin -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioin -j RETURN
-A ztunnel-PREROUTING -i istioout -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioout -j RETURN
-A ztunnel-PREROUTING -p udp -m udp --dport 6081 -j RETURN
-A ztunnel-PREROUTING -m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING ! -i {zt_veth} -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40
-A ztunnel-PREROUTING -m mark --mark 0x40/0x40 -j RETURN
-A ztunnel-PREROUTING ! -s {zt_ip}/32 -i {zt_veth} -j MARK --set-xmark 0x210/0x210
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -i {zt_veth} -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -p udp -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100
COMMIT
"""


def node_nat_save() -> str:
    """§1.5 nat table on a node, without the DNS-capture DNAT (ISTIO_META_DNS_CAPTURE unset)."""
    return """\
*nat
:PREROUTING ACCEPT
:INPUT ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
:ztunnel-POSTROUTING -
:ztunnel-PREROUTING -
-A PREROUTING -j ztunnel-PREROUTING
-A POSTROUTING -j ztunnel-POSTROUTING
-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT
-A ztunnel-PREROUTING -m mark --mark 0x100/0x100 -j ACCEPT
COMMIT
"""


EMPTY_FILTER_SAVE = """\
*filter
:INPUT ACCEPT
:FORWARD ACCEPT
:OUTPUT ACCEPT
COMMIT
"""

EMPTY_NAT_SAVE = """\
*nat
:PREROUTING ACCEPT
:INPUT ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
COMMIT
"""


def node_filter_save() -> str:
    """§1.5: istio-cni 1.18 writes nothing in the filter table."""
    return EMPTY_FILTER_SAVE


def node_save(zt_ip: str, zt_veth: str, host_ip: str) -> dict[str, str]:
    return {"mangle": node_mangle_save(zt_ip, zt_veth, host_ip), "nat": node_nat_save(), "filter": node_filter_save()}


def ztunnel_save(zt_ip: str) -> dict[str, str]:
    """§2.2: only mangle PREROUTING inside the ztunnel netns (nat OUTPUT flushed = empty)."""
    mangle = f"""\
*mangle
:PREROUTING ACCEPT
:INPUT ACCEPT
:FORWARD ACCEPT
:OUTPUT ACCEPT
:POSTROUTING ACCEPT
-A PREROUTING -i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING -i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING -i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING ! -d {zt_ip}/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff
COMMIT
"""
    return {"mangle": mangle, "nat": EMPTY_NAT_SAVE, "filter": EMPTY_FILTER_SAVE}


def sidecar_nat_save() -> str:
    """§6: istio-iptables REDIRECT ruleset as iptables-legacy-save prints it (chains sorted by name,
    built-in chain rules first, ``--dport`` with an implicit ``-m tcp``)."""
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
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
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


def node_ip_rules() -> list[str]:
    """§1.6 plus the kernel's three default rules, as ``ip rule show`` prints them."""
    return [
        "0:\tfrom all lookup local",
        "100:\tfrom all fwmark 0x200/0x200 goto 32766",
        "101:\tfrom all fwmark 0x100/0x100 lookup 101",
        "102:\tfrom all fwmark 0x40/0x40 lookup 102",
        "103:\tfrom all lookup 100",
        "32766:\tfrom all lookup main",
        "32767:\tfrom all lookup default",
    ]


def ztunnel_ip_rules() -> list[str]:
    """§2.3: 20000 and 20003 only (20001/20002 do not exist in 1.18)."""
    return [
        "0:\tfrom all lookup local",
        "20000:\tfrom all fwmark 0x400/0xfff lookup 100",
        "20003:\tfrom all fwmark 0x4d3/0xfff lookup 100",
        "32766:\tfrom all lookup main",
        "32767:\tfrom all lookup default",
    ]


def node_routes(zt_ip: str, zt_veth: str, host_ip: str, enrolled_ips: Iterable[str]) -> dict[int, list[str]]:
    """§1.7 / §3 tables 100-102, each as a sorted list of ``ip route show table N`` lines."""
    t100 = [f"{zt_ip} dev {zt_veth} scope link"]
    t100 += [f"{ip} via 192.168.126.2 dev istioin src {host_ip}" for ip in enrolled_ips]
    return {
        100: sorted(t100),
        101: sorted([f"{zt_ip} dev {zt_veth} scope link", "default via 192.168.127.2 dev istioout"]),
        102: sorted([f"{zt_ip} dev {zt_veth} scope link", f"default via {zt_ip} dev {zt_veth} onlink"]),
    }


def node_main_routes_include() -> list[str]:
    """§1.7 main: the kernel-connected /30s of the two tunnel devices."""
    return [
        "192.168.126.0/30 dev istioin proto kernel scope link src 192.168.126.1",
        "192.168.127.0/30 dev istioout proto kernel scope link src 192.168.127.1",
    ]


def ztunnel_routes(host_ip_br: str) -> dict[int, list[str]]:
    """§2.3 tables 100-102 in the ztunnel netns."""
    return {
        100: ["local default dev lo scope host"],
        101: sorted([f"{host_ip_br} dev eth0 scope link", "default via 192.168.127.1 dev pistioout"]),
        102: sorted([f"{host_ip_br} dev eth0 scope link", "default via 192.168.126.1 dev pistioin"]),
    }


def ztunnel_main_routes_include() -> list[str]:
    return [
        "192.168.126.0/30 dev pistioin proto kernel scope link src 192.168.126.2",
        "192.168.127.0/30 dev pistioout proto kernel scope link src 192.168.127.2",
    ]


IPSET_NAME = "ztunnel-pods-ips"
IPSET_TYPE = "hash:ip"


def node_ipset_members(enrolled_ips: Iterable[str]) -> list[str]:
    """§1.4 / §3: the enrolled (IPv4) pod IPs; each entry carries a comment (the pod UID)."""
    return sorted(enrolled_ips, key=ipaddress.IPv4Address)


def node_sysctls(zt_veth: str, enrolled_veths: Iterable[str]) -> dict[str, str]:
    """§1.8 / §3."""
    d = {
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        f"net.ipv4.conf.{zt_veth}.rp_filter": "0",
        f"net.ipv4.conf.{zt_veth}.accept_local": "1",
        "net.ipv4.conf.istioin.rp_filter": "0",
        "net.ipv4.conf.istioin.accept_local": "1",
        "net.ipv4.conf.istioout.rp_filter": "0",
        "net.ipv4.conf.istioout.accept_local": "1",
    }
    for v in enrolled_veths:
        d[f"net.ipv4.conf.{v}.rp_filter"] = "0"
    return d


def ztunnel_sysctls() -> dict[str, str]:
    """§2.4."""
    return {
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        "net.ipv4.conf.pistioin.rp_filter": "0",
        "net.ipv4.conf.pistioout.rp_filter": "0",
        "net.ipv4.conf.eth0.rp_filter": "0",
    }


def node_tunnel_addresses() -> dict[str, str]:
    """§1.3 device -> address/prefix."""
    return {"istioin": "192.168.126.1/30", "istioout": "192.168.127.1/30"}


def ztunnel_tunnel_addresses() -> dict[str, str]:
    """§2.1."""
    return {"pistioin": "192.168.126.2/30", "pistioout": "192.168.127.2/30"}


def node_tunnels(zt_ip: str) -> dict[str, tuple[int, str]]:
    """§1.3 device -> (VNI, remote)."""
    return {"istioin": (1000, zt_ip), "istioout": (1001, zt_ip)}


def ztunnel_tunnels(host_ip_br: str) -> dict[str, tuple[int, str]]:
    """§2.1 device -> (VNI, remote)."""
    return {"pistioin": (1000, host_ip_br), "pistioout": (1001, host_ip_br)}


# =====================================================================================
# Normalisers: live command output -> the forms above
# =====================================================================================

_COUNTERS = re.compile(r" \[\d+:\d+\]$")


def normalise_save(text: str, table: str) -> str:
    """The ``*table`` .. ``COMMIT`` block of iptables-save output, without comment lines
    (``# Generated by``/``# Completed on``) and without chain counters. '' if the table is absent."""
    out: list[str] = []
    inside = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("#") or not line:
            continue
        if line == f"*{table}":
            inside = True
        if inside:
            out.append(_COUNTERS.sub("", line))
            if line == "COMMIT":
                break
    return "\n".join(out) + "\n" if out else ""


def drop_chains(save: str, prefix: str = "KUBE-") -> str:
    """Remove chains whose name starts with ``prefix`` from a normalised save block: their
    declarations, their rules, and the jumps to them (the lab's kube-proxy stand-in)."""
    keep: list[str] = []
    for line in save.splitlines():
        if line.startswith(f":{prefix}") or line.startswith(f"-A {prefix}") or f" -j {prefix}" in line:
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


def first_rule(save: str, chain: str) -> str | None:
    """The first ``-A <chain>`` line of a normalised save block (position 1)."""
    for line in save.splitlines():
        if line.startswith(f"-A {chain} "):
            return line
    return None


_ROUTE_FLAGS = {"linkdown", "dead"}


def normalise_route_line(line: str) -> str:
    return " ".join(w for w in line.split() if w not in _ROUTE_FLAGS)


def split_route_tables(text: str) -> dict[str, list[str]]:
    """``ip -4 route show table all`` -> {table: sorted lines without the ``table X`` words}.

    Routes of the main table carry no ``table`` word; they are filed under ``"main"``."""
    tables: dict[str, list[str]] = {}
    for raw in text.splitlines():
        words = normalise_route_line(raw).split()
        if not words:
            continue
        table = "main"
        if "table" in words:
            i = words.index("table")
            table = words[i + 1]
            del words[i:i + 2]
        tables.setdefault(table, []).append(" ".join(words))
    return {k: sorted(v) for k, v in tables.items()}


def normalise_ip_rules(text: str) -> list[str]:
    """``ip rule show`` lines, with the whitespace after the priority normalised to one tab."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        prio, _, rest = line.partition(":")
        out.append(f"{prio.strip()}:\t{' '.join(rest.split())}")
    return out


def parse_ipset_list(text: str) -> tuple[str, str, dict[str, str | None]]:
    """``ipset list NAME`` -> (type, header, {ip: comment or None})."""
    typ = header = ""
    members: dict[str, str | None] = {}
    in_members = False
    for line in text.splitlines():
        if line.startswith("Type:"):
            typ = line.split(":", 1)[1].strip()
        elif line.startswith("Header:"):
            header = line.split(":", 1)[1].strip()
        elif line.startswith("Members:"):
            in_members = True
        elif in_members and line.strip():
            ip, _, rest = line.strip().partition(" ")
            m = re.match(r'comment "(.*)"', rest)
            members[ip] = m.group(1) if m else None
    return typ, header, members


# =====================================================================================
# Plan renderers: plan values -> the forms above (the unit tests' "observed" side)
# =====================================================================================

BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}


def _of(objs: Iterable[Any], typ: str, netns: str) -> list[Any]:
    return [o for o in objs if type(o).__name__ == typ and getattr(o, "netns", None) == netns]


def render_save(objs: Sequence[Any], netns: str, table: str) -> str:
    """What iptables-legacy-save would print for ``table`` after applying ``objs`` in Plan order:
    chains first (each jump inserted at position 1), then rules appended in list order.
    legacy save lists built-in chains in kernel order and user chains sorted by name."""
    builtins = BUILTIN_CHAINS[table]
    chains: dict[str, list[str]] = {c: [] for c in builtins}
    for c in _of(objs, "IptChain", netns):
        if c.table != table:
            continue
        chains.setdefault(c.chain, [])
        if c.jump_from:
            chains.setdefault(c.jump_from, []).insert(0, f"-j {c.chain}")
    for r in _of(objs, "IptRule", netns):
        if r.table == table:
            chains.setdefault(r.chain, []).append(r.spec)
    users = sorted(c for c in chains if c not in builtins)
    lines = [f"*{table}"] + [f":{c} ACCEPT" for c in builtins] + [f":{c} -" for c in users]
    for c in list(builtins) + users:
        lines += [f"-A {c} {spec}" for spec in chains[c]]
    return "\n".join(lines + ["COMMIT"]) + "\n"


def render_ip_rules(objs: Sequence[Any], netns: str) -> list[str]:
    rules = {0: "0:\tfrom all lookup local", 32766: "32766:\tfrom all lookup main",
             32767: "32767:\tfrom all lookup default"}
    for r in _of(objs, "Rule", netns):
        sel = f" fwmark {r.fwmark:#x}/{r.fwmask:#x}" if r.fwmark is not None else ""
        act = f" goto {r.goto}" if r.goto is not None else f" lookup {r.table}"
        rules[r.priority] = f"{r.priority}:\tfrom all{sel}{act}"
    return [rules[p] for p in sorted(rules)]


def render_route(r: Any) -> str:
    """One Route in ``ip route show table N`` spelling (no kernel-added proto/src words)."""
    dst = "default" if r.dst == "0.0.0.0/0" else r.dst.removesuffix("/32")
    words = [] if r.type == "unicast" else [r.type]
    words.append(dst)
    if r.gateway:
        words += ["via", r.gateway]
    if r.dev:
        words += ["dev", r.dev]
    if r.scope != "universe":
        words += ["scope", r.scope]
    if r.src:
        words += ["src", r.src]
    if r.onlink:
        words.append("onlink")
    return " ".join(words)


def render_routes(objs: Sequence[Any], netns: str, tables: Iterable[int]) -> dict[int, list[str]]:
    want = set(tables)
    out: dict[int, list[str]] = {t: [] for t in want}
    for r in _of(objs, "Route", netns):
        if r.table in want:
            out[r.table].append(render_route(r))
    return {t: sorted(v) for t, v in out.items()}


def render_sysctls(objs: Sequence[Any], netns: str) -> dict[str, str]:
    return {s.key_name: s.value for s in _of(objs, "Sysctl", netns)}
