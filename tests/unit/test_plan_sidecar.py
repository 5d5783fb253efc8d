"""Plan-level check of §6: netlab.plan.sidecar rendered to iptables-save form must equal the
hand-written expectation in tests/reference_expect.py."""

from __future__ import annotations

from netlab.plan.sidecar import sidecar_objects
from netlab.plan.types import IptChain, IptRule
from tests import reference_expect as X

NS = "lab-bar-sleep"


def test_sidecar_nat_equals_reference() -> None:
    assert X.render_save(sidecar_objects(NS), NS, "nat") == X.sidecar_nat_save()


def test_sidecar_touches_only_nat_in_its_own_netns() -> None:
    objs = sidecar_objects(NS)
    assert {o.netns for o in objs} == {NS}
    assert {o.table for o in objs} == {"nat"}
    assert X.render_save(objs, NS, "mangle").count("-A ") == 0
    assert X.render_save(objs, NS, "filter") == X.EMPTY_FILTER_SAVE


def test_chains_have_no_jump_from_and_builtin_jumps_are_rules() -> None:
    objs = sidecar_objects(NS)
    chains = [o for o in objs if isinstance(o, IptChain)]
    assert [c.chain for c in chains] == ["ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"]
    assert all(c.jump_from is None for c in chains)
    builtin = [(r.chain, r.spec) for r in objs if isinstance(r, IptRule) and r.chain in ("PREROUTING", "OUTPUT")]
    assert builtin == [("PREROUTING", "-p tcp -j ISTIO_INBOUND"), ("OUTPUT", "-p tcp -j ISTIO_OUTPUT")]


def test_istio_iptables_append_order() -> None:
    """§6 lists the appends interleaved across chains; the plan keeps that order."""
    rules = [(r.chain, r.spec.split("-j ", 1)[-1]) for r in sidecar_objects(NS) if isinstance(r, IptRule)]
    assert rules[:4] == [("ISTIO_INBOUND", "RETURN"), ("ISTIO_REDIRECT", "REDIRECT --to-ports 15001"),
                         ("ISTIO_IN_REDIRECT", "REDIRECT --to-ports 15006"), ("PREROUTING", "ISTIO_INBOUND")]
    assert rules[-1] == ("ISTIO_OUTPUT", "ISTIO_REDIRECT")
    assert len(rules) == 18


def test_refs_unique_and_keys_unique() -> None:
    objs = sidecar_objects(NS)
    refs = [r.ref for r in objs if isinstance(r, IptRule)]
    assert len(set(refs)) == len(refs)
    assert len({o.key for o in objs}) == len(objs)
