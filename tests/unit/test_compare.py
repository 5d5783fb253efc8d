"""`netlab compare`'s pure parts (no root): the two lab names, the rows aligned by hop number, and
the facts that disappear and appear between two traces."""

from __future__ import annotations

import pytest

from netlab.errors import UsageError
from netlab.verify.compare import facts, lab_names, side_by_side
from netlab.verify.hops import ObservedHop


def pkt(n: str | None, at: str, iface: str, d: str, dst: str, **kw: object) -> ObservedHop:
    return ObservedHop("packet", 0.0, at, at, "", "10.0.1.3:2000", dst, iface=iface, iface_sym=iface, dir=d,  # type: ignore[arg-type]
                       seed_n=n, **kw)  # type: ignore[arg-type]


def proxy(n: str, at: str, listener: str) -> ObservedHop:
    return ObservedHop("proxy", 0.0, at, at, "", "10.0.1.3:2000", "10.96.0.10:8000", seed_n=n,
                       proxy={"component": "ztunnel-node-a", "listener": listener})


OLD = [pkt("1", "pod:foo/sleep", "eth0", "out", "10.96.0.10:8000"),
       pkt("2", "node:node-a", "veth(foo/sleep)", "in", "10.96.0.10:8000", mark=0x100, rules=["§1.5 mangle ztunnel-PREROUTING #15"],
           table=101, route="ip rule 101 (fwmark 0x100/0x100) -> table 101: ..."),
       pkt("3", "node:node-a", "istioout", "out", "10.96.0.10:8000"),
       pkt(None, "node:node-a", "veth(ztunnel)", "out", "10.96.0.10:8000"),
       proxy("5", "ztunnel:node-a", "outbound:15001")]
NEW = [pkt("1", "pod:foo/sleep", "lo", "out", "127.0.0.1:15001", rules=["§1.4 nat ISTIO_OUTPUT #6"]),
       pkt(None, "pod:foo/sleep", "lo", "in", "127.0.0.1:15001"),
       proxy("5", "pod:foo/sleep", "outbound:15001")]


def test_rows_line_up_by_hop_number_and_leave_gaps_for_hops_that_went() -> None:
    rows = side_by_side(OLD, NEW)
    assert [(a.split()[0] if a else "", b.split()[0] if b else "") for a, b in rows] == [
        ("(1)", "(1)"), ("", "·"), ("(2)", ""), ("(3)", ""), ("·", ""), ("(5)", "(5)")]
    assert rows[-1][1].endswith("pod:foo/sleep ztunnel:15001")


def test_facts_name_devices_rules_marks_tables_and_listeners_with_their_place() -> None:
    old, new = facts(OLD), facts(NEW)
    assert old["devices"] - new["devices"] == {"node:node-a istioout", "node:node-a veth(foo/sleep)",
                                                "node:node-a veth(ztunnel)", "pod:foo/sleep eth0"}
    assert old["marks"] == {"node:node-a veth(foo/sleep) in: 0x100"} and not new["marks"]
    assert old["tables"] == {"node:node-a: ip rule 101 (fwmark 0x100/0x100) -> table 101"}
    assert new["rules"] == {"pod:foo/sleep: §1.4 nat ISTIO_OUTPUT #6"}
    assert (old["listeners"], new["listeners"]) == ({"ztunnel:node-a ztunnel:15001"}, {"pod:foo/sleep ztunnel:15001"})


def test_lab_names_and_a_base_too_long_for_them() -> None:
    assert lab_names("s3") == {"istio-1.18": "s3-1-18", "inpod": "s3-inpod"}
    with pytest.raises(UsageError, match="--name 'a{36}'.*-inpod"):
        lab_names("a" * 36)
