"""Which iptables rules a traced SYN matched, and which ip rule / table routed it.

Why simulate *and* count: counters (``iptables-legacy-save -c`` before and after) prove that a
rule fired, but not for which packet, and a trace crosses the same node twice (pod veth in, then
the ztunnel's spoofed leg in). So the plan's rules are replayed here for each SYN sighting (a SYN
always opens a new conntrack entry, so connmark is 0 and the skb mark starts at 0 after a netns
crossing: everything the rules read is known), and a simulated match is reported only if the
kernel's counter for that rule moved too. A rule the simulation predicts but the kernel did not
count is kept apart (``rules_unconfirmed``): that is a bug in this module or a stale plan.

The route is the kernel's own answer: ``ip route get <dst> from <src> iif <iface> mark <mark>``
in that namespace, so a deleted route shows up as what the kernel really does now.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from netlab.netns import in_netns
from netlab.plan.iptspec import Spec, parse_spec
from netlab.plan.types import MAIN_TABLE, IptRule, Plan

LOCAL_TABLE = 255
BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


@dataclass
class Pkt:
    """What the rules of one namespace can see of a SYN."""

    iif: str | None
    oif: str | None
    src: str
    dst: str
    dport: int
    proto: str = "tcp"
    mark: int = 0
    connmark: int = 0
    uid: int | None = None
    gid: int | None = None


@dataclass
class _R:
    ref: str
    chain: str
    spec: Spec
    text: str


@dataclass
class Ruleset:
    """One namespace's rules as the kernel walks them: table -> chain -> rules in order."""

    chains: dict[str, dict[str, list[_R]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    ipsets: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    @classmethod
    def from_save(cls, plan: Plan, netns: str, save: str) -> Ruleset:
        """The rules in the kernel's order (``iptables-legacy-save`` text), each named by the plan
        rule it came from; jumps the plan made implicitly (``-I <builtin> 1 -j <chain>``) get no ref."""
        rs = cls()
        refs: dict[tuple[str, str, str], list[str]] = defaultdict(list)
        for r in plan.ipt_rules:
            if r.netns == netns:
                refs[(r.table, r.chain, r.spec)].append(r.ref or f"{r.table} {r.chain}")
        used: dict[tuple[str, str, str], int] = defaultdict(int)
        table = ""
        for line in save.splitlines():
            if line.startswith("*"):
                table = line[1:]
                continue
            m = _SAVE_LINE.match(line) or _SAVE_LINE_NC.match(line)
            if not m:
                continue
            chain, spec = m.group("chain"), m.group("spec")
            k = (table, chain, spec)
            i = used[k]
            used[k] += 1
            ref = refs[k][i] if i < len(refs[k]) else ""
            try:
                rs.chains[table][chain].append(_R(ref, chain, parse_spec(spec), spec))
            except ValueError:
                continue  # a rule this parser cannot read (not one of the lab's): never claimed
        for e in plan.ipset_entries:
            if e.netns == netns:
                rs.ipsets[e.set].add(e.ip)
        return rs

    def run(self, table: str, chain: str, p: Pkt, hits: list[str]) -> str:
        """Walk ``table``/``chain``; append matched refs to ``hits``; return the verdict
        (``continue`` | ``accept`` | ``tproxy`` | ``redirect`` | ``return``). Mutates ``p``."""
        for r in self.chains.get(table, {}).get(chain, []):
            if not self._matches(r.spec, p):
                continue
            if r.ref:
                hits.append(r.ref)
            tgt = r.spec.target
            assert tgt is not None
            name = tgt.name
            opts = {o.name: o.args for o in tgt.opts}
            if name == "MARK":
                v, m = _vm(opts.get("set-xmark") or opts.get("set-mark") or ["0"], full=bool(opts.get("set-mark")))
                p.mark = (p.mark & ~m) ^ v
            elif name == "CONNMARK" and "save-mark" in opts:
                nf = int(opts.get("nfmask", ["0xffffffff"])[0], 0)
                ct = int(opts.get("ctmask", ["0xffffffff"])[0], 0)
                p.connmark = (p.connmark & ~ct) | (p.mark & nf)
            elif name == "CONNMARK" and "restore-mark" in opts:  # in-pod §1.4 mangle ISTIO_OUTPUT #1
                nf = int(opts.get("nfmask", ["0xffffffff"])[0], 0)
                ct = int(opts.get("ctmask", ["0xffffffff"])[0], 0)
                p.mark = (p.mark & ~nf) ^ (p.connmark & ct)
            elif name == "CONNMARK" and ("set-xmark" in opts or "set-mark" in opts):  # in-pod §1.4 mangle ISTIO_PRERT #1
                v, m = _vm(opts.get("set-xmark") or opts["set-mark"])
                p.connmark = (p.connmark & ~m) ^ v
            elif name == "RETURN":
                return "return"
            elif name == "ACCEPT":
                return "accept"
            elif name == "TPROXY":
                v, m = _vm(opts.get("tproxy-mark", ["0"]))
                p.mark = (p.mark & ~m) ^ v
                return "tproxy"
            elif name == "DNAT":
                ip, _, port = opts.get("to-destination", [""])[0].partition(":")
                p.dst, p.dport = ip or p.dst, int(port) if port else p.dport
                return "dnat"
            elif name == "REDIRECT":
                p.dst = "127.0.0.1" if p.iif is None else p.dst
                p.dport = int(opts.get("to-ports", [str(p.dport)])[0])
                return "redirect"
            elif name in self.chains.get(table, {}) or name not in ("DROP", "REJECT", "LOG"):
                verdict = self.run(table, name, p, hits)
                if verdict not in ("continue", "return"):
                    return verdict
            else:
                return name.lower()
        return "continue"

    def _matches(self, s: Spec, p: Pkt) -> bool:
        if s.src and not _neg(s.src, lambda x: _in_net(p.src, x)):
            return False
        if s.dst and not _neg(s.dst, lambda x: _in_net(p.dst, x)):
            return False
        if s.in_iface and not _neg(s.in_iface, lambda x: _iface(p.iif, x)):
            return False
        if s.out_iface and not _neg(s.out_iface, lambda x: _iface(p.oif, x)):
            return False
        if s.proto and not _neg(s.proto, lambda x: x == p.proto):
            return False
        for m in s.matches:
            for o in m.opts:
                ok = self._opt(m.name, o.name, o.args, p)
                if ok is None:
                    return False  # a match this simulator does not know: do not claim it
                if ok == o.neg:
                    return False
        return True

    def _opt(self, ext: str, name: str, args: list[str], p: Pkt) -> bool | None:
        if ext in ("tcp", "udp") and name in ("dport", "destination-port"):
            return _port_in(p.dport, args[0])
        if ext == "mark" and name == "mark":
            v, m = _vm(args)
            return (p.mark & m) == v
        if ext == "connmark" and name == "mark":
            v, m = _vm(args)
            return (p.connmark & m) == v
        if ext == "set" and name == "match-set":
            return args[1] == "src" and p.src in self.ipsets.get(args[0], set())
        if ext == "owner" and name == "uid-owner":
            return p.uid is not None and p.uid == int(args[0])
        if ext == "owner" and name == "gid-owner":
            return p.gid is not None and p.gid == int(args[0])
        return None


def _vm(args: list[str], full: bool = False) -> tuple[int, int]:
    v, _, m = args[0].partition("/")
    return int(v, 0), (int(m, 0) if m else 0xFFFFFFFF)


def _neg(val: str, test: Callable[[str], bool]) -> bool:
    return not test(val[1:]) if val.startswith("!") else test(val)


def _in_net(ip: str, cidr: str) -> bool:
    try:
        return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(cidr, strict=False)
    except ValueError:
        return False


def _iface(have: str | None, want: str) -> bool:
    if have is None:
        return False
    return have.startswith(want[:-1]) if want.endswith("+") else have == want


def _port_in(port: int, spec: str) -> bool:
    lo, _, hi = spec.partition(":")
    return int(lo) <= port <= int(hi or lo)


# ---- counters --------------------------------------------------------------------------------
_SAVE_LINE = re.compile(r"^\[(?P<pkts>\d+):(?P<bytes>\d+)\] -A (?P<chain>\S+) (?P<spec>.*)$")
_SAVE_LINE_NC = re.compile(r"^-A (?P<chain>\S+) (?P<spec>.*)$")


def read_counters(plan: Plan, netns: str) -> tuple[str, dict[str, int], str]:
    """Packet counters of the plan's rules in ``netns``, keyed by :func:`counter_key` (the same
    text can stand twice in one chain: §1.5 #7 and #11); also the save text itself."""
    with in_netns(netns):  # the child of a thread inside netns is born inside it
        out = subprocess.run(["iptables-legacy-save", "-c"], capture_output=True, text=True, timeout=5).stdout
    seen: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    table = ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
            continue
        m = _SAVE_LINE.match(line)
        if m:
            seen[(table, m.group("chain"), m.group("spec"))].append(int(m.group("pkts")))
    res: dict[str, int] = {}
    used: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in plan.ipt_rules:
        if r.netns != netns:
            continue
        k = (r.table, r.chain, r.spec)
        i = used[k]
        used[k] += 1
        vals = seen.get(k, [])
        if i < len(vals):
            res[counter_key(r, i)] = vals[i]
    return netns, res, out


def counter_key(r: IptRule, occurrence: int) -> str:
    return f"{r.netns}|{r.ref}|{occurrence}"


def ref_counters(plan: Plan, counters: dict[str, int]) -> dict[tuple[str, str], int]:
    """(netns, ref) -> packets, summing duplicates of the same ref."""
    out: dict[tuple[str, str], int] = defaultdict(int)
    for k, v in counters.items():
        ns, ref, _ = k.split("|")
        out[(ns, ref)] += v
    return out


# ---- routes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouteAnswer:
    table: int | None
    text: str  # "ip rule 101 (fwmark 0x100/0x100) -> table 101: 10.96.0.10 via ... dev istioout"
    oif: str | None
    local: bool


def route_get(plan: Plan, netns: str, dst: str, src: str, iif: str | None, mark: int) -> RouteAnswer:
    """The route of a packet received on ``iif``, or (``iif`` None) sent by a local socket."""
    cmd = ["ip", "-o", "-n", netns, "route", "get", dst, "from", src] + (["iif", iif] if iif else [])
    if mark:
        cmd += ["mark", hex(mark)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    if r.returncode != 0:
        return RouteAnswer(None, f"no route ({r.stderr.strip() or 'ip route get failed'})", None, False)
    line = r.stdout.split("\\")[0].strip()
    toks = line.split()
    table: int | None = MAIN_TABLE
    if "table" in toks:
        t = toks[toks.index("table") + 1]
        table = {"main": MAIN_TABLE, "local": LOCAL_TABLE}.get(t, int(t) if t.isdigit() else None)
    oif = toks[toks.index("dev") + 1] if "dev" in toks else None
    local = toks[0] == "local"
    return RouteAnswer(table, f"{_which_rule(plan, netns, mark, table)} -> table {_tname(table)}: {line}", oif, local)


def _tname(t: int | None) -> str:
    return {MAIN_TABLE: "main", LOCAL_TABLE: "local"}.get(t, str(t)) if t is not None else "?"


def _which_rule(plan: Plan, netns: str, mark: int, table: int | None) -> str:
    """The first ip rule of the plan that selects ``mark`` and leads to ``table``."""
    if table == LOCAL_TABLE:
        return "ip rule 0"
    for r in sorted((r for r in plan.rules if r.netns == netns), key=lambda r: r.priority):
        if r.fwmark is not None and (mark & (r.fwmask or 0xFFFFFFFF)) != r.fwmark:
            continue
        target = MAIN_TABLE if r.goto is not None else r.table
        if target == table:
            sel = f" (fwmark {r.fwmark:#x}/{r.fwmask or 0xFFFFFFFF:#x})" if r.fwmark is not None else ""
            return f"ip rule {r.priority}{sel}"
    return "ip rule 32766" if table == MAIN_TABLE else "ip rule ?"

