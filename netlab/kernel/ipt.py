"""iptables chains and rules through python-iptables (libiptc, the *legacy* backend).

The plan stores each rule exactly as ``iptables-legacy-save`` prints it after ``-A <chain>``;
:func:`netlab.plan.iptspec.parse_spec` turns that argument string into a neutral structure and
:func:`build_rule` into an ``iptc.Rule`` (each ``--option`` goes through the extension's own
parser, so the kernel blob is what ``iptables`` itself would build).

Two python-iptables traps are avoided here:

- ``iptc.Table(name)`` is a process-wide cache keyed by table name, holding a libiptc handle
  made in whatever netns the first caller was in; with autocommit it even commits that handle
  back on refresh. We never use the cache: :func:`open_table` builds a private ``Table`` in
  the calling thread (already inside the target netns), with autocommit off, and we check the
  netns of libiptc's own socket (the first field of its handle) before committing.
- libiptc/libxtables keep global state (the loaded extensions, ``xt_params``), so all of it
  runs under one process-wide lock.

Building a rule (parsing every option through its extension) costs ~0.7 ms of Python and C under
that lock; an in-pod lab installs the same dozen rules in every enrolled pod, 12,000 appends
for 1,000 pods, and apply spent most of its time here, one thread at a time (issue 24). So a
rule's kernel blob (``struct ipt_entry`` with its matches and target) is built once per
distinct (table, spec, target-is-a-user-chain) and copied for the next table that wants it:
``iptc_append_entry`` copies the blob into the handle and resolves a jump on its copy. Not for
``-m set``: its blob holds the set's index in the netns where it was built (:func:`_cacheable`).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from netlab import netns as ns
from netlab.plan.iptspec import parse_spec

_LOCK = threading.Lock()


_rule_cls: type[Any] | None = None
#: (table, spec, target is a user chain of the table) -> the rule's kernel blob; under _LOCK
_BLOBS: dict[tuple[str, str, bool], bytes] = {}
_BLOBS_MAX = 4096
_TARGETS: dict[str, str] = {}  # spec -> its target's name (parse_spec is shlex: not free)


def _cacheable(spec: str) -> bool:
    """A blob that means the same in every netns: no ipset reference (an index per netns)."""
    return "--match-set" not in spec and "-m set" not in spec


def _private_rule(tables: list[Any]) -> Any:
    """An ``iptc.Rule`` whose ``tables`` are ours (python-iptables has no types: its objects are Any).

    ``iptc.Rule.tables`` (used to decide whether ``-j NAME`` is a user chain) would otherwise
    instantiate the cached, autocommitting ``iptc.Table`` objects in the current netns.
    """
    global _rule_cls
    if _rule_cls is None:
        import iptc

        class PrivateRule(iptc.Rule):  # type: ignore[misc]  # (an untyped base class)
            tables = property(lambda self: self._netlab_tables)

        _rule_cls = PrivateRule
    rule = _rule_cls()
    rule._netlab_tables = tables
    return rule


def build_rule(spec: str, tables: list[Any]) -> Any:  # an iptc.Rule
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


def jump_rule(chain: str, tables: list[Any]) -> Any:  # an iptc.Rule
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
        key = (self.name, f"-j {chain}", True)  # (the chain was just created: a user chain)
        blob = _BLOBS.get(key)
        if blob is None:
            blob = bytes(jump_rule(chain, [self.table]).rule)
            if len(_BLOBS) < _BLOBS_MAX:
                _BLOBS[key] = blob
        self.table.insert_entry(builtin, (ctypes.c_ubyte * len(blob)).from_buffer_copy(blob), 0)

    def append(self, chain: str, spec: str) -> None:
        """Append ``spec`` to ``chain`` (call with the lock held): from the blob cache when
        the same rule was built before (see the module doc)."""
        if not _cacheable(spec):
            self.table.append_entry(chain, build_rule(spec, [self.table]).rule)
            return
        name = _TARGETS.get(spec)
        if name is None:
            t = parse_spec(spec).target
            name = t.name if t else ""
            if len(_TARGETS) < _BLOBS_MAX:
                _TARGETS[spec] = name
        key = (self.name, spec, bool(name) and bool(self.table.is_chain(name)))
        blob = _BLOBS.get(key)
        if blob is None:
            entry = build_rule(spec, [self.table]).rule
            blob = bytes(entry)
            if len(_BLOBS) < _BLOBS_MAX:
                _BLOBS[key] = blob
        self.table.append_entry(chain, (ctypes.c_ubyte * len(blob)).from_buffer_copy(blob))

    def insert(self, chain: str, spec: str, position: int) -> None:
        """``spec`` as rule ``position`` (0-based) of ``chain`` (a live change: kernel/live.py)."""
        rule = build_rule(spec, [self.table])
        self.table.insert_entry(chain, rule.rule, position)

    def delete(self, chain: str, spec: str) -> None:
        """The first rule of ``chain`` that is ``spec`` (IPTCError if there is none)."""
        rule = build_rule(spec, [self.table])
        self.table.delete_entry(chain, rule.rule, rule.mask)

    def remove_chain(self, chain: str, jump_from: str | None) -> None:
        """``chain``'s jumps from ``jump_from``, its rules, then the chain itself, if it exists
        (istio-cni's DeleteInpodRules: delete the jumps, flush and delete the chains)."""
        if not self.table.is_chain(chain):
            return
        if jump_from:
            jump = jump_rule(chain, [self.table])
            while True:
                try:
                    self.table.delete_entry(jump_from, jump.rule, jump.mask)
                except Exception:  # noqa: BLE001 - no (further) jump: done
                    break
        self.table.flush_entries(chain)
        self.table.delete_chain(chain)

    def commit(self) -> None:
        ns.assert_socket_in(self.sockfd(), self.expected_cookie, f"iptables -t {self.name} {self.where}")
        self.table.commit()

    def close(self) -> None:
        self.table.close()


def locked() -> threading.Lock:
    """The process-wide libiptc/libxtables lock."""
    return _LOCK
