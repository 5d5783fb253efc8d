"""iptables chains and rules through python-iptables (libiptc, the *legacy* backend).

The plan stores each rule exactly as ``iptables-legacy-save`` prints it after ``-A <chain>``;
:func:`parse_spec` turns that argument string into a neutral structure and :func:`build_rule`
into an ``iptc.Rule`` (each ``--option`` goes through the extension's own parser, so the
kernel blob is what ``iptables`` itself would build).

Two python-iptables traps are avoided here:

- ``iptc.Table(name)`` is a process-wide cache keyed by table name, holding a libiptc handle
  made in whatever netns the first caller was in; with autocommit it even commits that handle
  back on refresh. We never use the cache: :func:`open_table` builds a private ``Table`` in
  the calling thread (already inside the target netns), with autocommit off, and we check the
  netns of libiptc's own socket (the first field of its handle) before committing.
- libiptc/libxtables keep global state (the loaded extensions, ``xt_params``), so all of it
  runs under one process-wide lock. Rule sets are small; this is not the bottleneck.
"""

from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass, field

from netlab import netns as ns

_LOCK = threading.Lock()


class IptSpecError(ValueError):
    pass


@dataclass
class Opt:
    name: str  # without leading dashes, e.g. "dport"
    args: list[str]
    neg: bool = False


@dataclass
class Ext:
    name: str
    opts: list[Opt] = field(default_factory=list)


@dataclass
class Spec:
    src: str | None = None  # "!" prefix when negated, as python-iptables expects
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    proto: str | None = None
    matches: list[Ext] = field(default_factory=list)
    target: Ext | None = None
    goto: bool = False


_BASIC = {"-s": "src", "--source": "src", "-d": "dst", "--destination": "dst",
          "-i": "in_iface", "--in-interface": "in_iface", "-o": "out_iface", "--out-interface": "out_iface",
          "-p": "proto", "--protocol": "proto"}


def parse_spec(spec: str) -> Spec:
    """Parse iptables-save rule arguments (everything after ``-A <chain>``)."""
    toks = shlex.split(spec)
    out = Spec()
    cur: Ext | None = None  # the match or target whose options we are reading
    neg = False
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "!":
            if neg:
                raise IptSpecError(f"double '!' in {spec!r}")
            neg = True
            i += 1
            continue
        if t in _BASIC:
            if i + 1 >= len(toks):
                raise IptSpecError(f"{t} needs a value in {spec!r}")
            setattr(out, _BASIC[t], ("!" if neg else "") + toks[i + 1])
            neg = False
            i += 2
            continue
        if t in ("-m", "--match"):
            cur = Ext(toks[i + 1])
            out.matches.append(cur)
            i += 2
            continue
        if t in ("-j", "--jump", "-g", "--goto"):
            if out.target is not None:
                raise IptSpecError(f"two targets in {spec!r}")
            cur = out.target = Ext(toks[i + 1])
            out.goto = t in ("-g", "--goto")
            i += 2
            continue
        if t.startswith("--"):
            if cur is None:
                # "-p tcp --dport 80": iptables loads the protocol's match implicitly
                if not out.proto or out.proto.startswith("!"):
                    raise IptSpecError(f"option {t} without a match in {spec!r}")
                cur = Ext(out.proto)
                out.matches.append(cur)
            j = i + 1
            while j < len(toks) and toks[j] != "!" and not toks[j].startswith("-"):
                j += 1
            cur.opts.append(Opt(t[2:], toks[i + 1:j], neg))
            neg = False
            i = j
            continue
        raise IptSpecError(f"unexpected {t!r} in {spec!r}")
    if neg:
        raise IptSpecError(f"dangling '!' in {spec!r}")
    if out.target is None:
        raise IptSpecError(f"no target (-j) in {spec!r}")
    return out


_rule_cls = None


def _private_rule(tables: list) -> "iptc.Rule":  # noqa: F821
    """An ``iptc.Rule`` whose ``tables`` are ours.

    ``iptc.Rule.tables`` (used to decide whether ``-j NAME`` is a user chain) would otherwise
    instantiate the cached, autocommitting ``iptc.Table`` objects in the current netns.
    """
    global _rule_cls
    if _rule_cls is None:
        import iptc

        class PrivateRule(iptc.Rule):
            tables = property(lambda self: self._netlab_tables)

        _rule_cls = PrivateRule
    rule = _rule_cls()
    rule._netlab_tables = tables
    return rule


def build_rule(spec: str, tables: list):  # -> iptc.Rule
    """An ``iptc.Rule`` for ``spec``. Call with the lock held, inside the target netns
    (``-m set`` resolves the set name through a socket it opens itself). ``tables``: the
    private Table objects in which a ``-j NAME`` user chain is looked up."""
    p = parse_spec(spec)
    rule = _private_rule(tables)
    if p.src:
        rule.src = p.src
    if p.dst:
        rule.dst = p.dst
    if p.in_iface:
        rule.in_interface = p.in_iface
    if p.out_iface:
        rule.out_interface = p.out_iface
    if p.proto:
        rule.protocol = p.proto
    for m in p.matches:
        match = rule.create_match(m.name)
        for o in m.opts:
            match.parse(o.name, (["!"] if o.neg else []) + o.args)
    assert p.target is not None
    target = rule.create_target(p.target.name, goto=p.goto)
    for o in p.target.opts:
        target.parse(o.name, (["!"] if o.neg else []) + o.args)
    rule.final_check()
    return rule


def jump_rule(chain: str, tables: list):
    rule = _private_rule(tables)
    rule.create_target(chain)
    return rule


class TableTx:
    """One table of the calling thread's netns, changed in memory and committed once."""

    def __init__(self, name: str, expected_cookie: int, where: str) -> None:
        import iptc

        self.name = name
        self.where = where
        self.expected_cookie = expected_cookie
        t = object.__new__(iptc.Table)  # bypass iptc.Table's process-wide cache (see module doc)
        t._init(name, False)
        self.table = t

    def sockfd(self) -> int:
        # struct xtc_handle { int sockfd; ... }: python-iptables declares the handle as int*
        return int(self.table._handle[0])

    def create_chain(self, chain: str) -> None:
        self.table.create_chain(chain)

    def insert_jump(self, builtin: str, chain: str) -> None:
        rule = jump_rule(chain, [self.table])
        self.table.insert_entry(builtin, rule.rule, 0)

    def append(self, chain: str, spec: str) -> None:
        rule = build_rule(spec, [self.table])
        self.table.append_entry(chain, rule.rule)

    def commit(self) -> None:
        ns.assert_socket_in(self.sockfd(), self.expected_cookie, f"iptables -t {self.name} {self.where}")
        self.table.commit()

    def close(self) -> None:
        self.table.close()


def locked():
    """The process-wide libiptc/libxtables lock."""
    return _LOCK
