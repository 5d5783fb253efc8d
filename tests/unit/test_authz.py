"""L4 authorization policies (docs/policies.md): topology -> registry -> PolicyAuthorizer -> route verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from netlab.errors import TopologyError
from netlab.mesh.registry import Policy, Registry, build_registry
from netlab.mesh.ztunnel.authz import AllowAll, Connection, PolicyAuthorizer, evaluate, for_registry
from netlab.mesh.ztunnel.route import InboundRoute, Reject, Route, plan_inbound, plan_outbound, plan_plaintext
from netlab.plan.build import build_plan
from netlab.topology.load import load_topology, topologies_dir

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/baz/sa/default"


def _reg_with(tmp_path: Path, policies_yaml: str) -> Registry:
    text = (topologies_dir() / "ambient-to-ambient.yaml").read_text() + policies_yaml
    f = tmp_path / "a2a-pol.yaml"
    f.write_text(text)
    return build_registry(build_plan(load_topology(f), source=str(f)))


def _wl(reg: Registry, ref: str):  # type: ignore[no-untyped-def]
    return next(w for w in reg.workloads.values() if w.ref == ref)


def _conn(reg: Registry, src: str | None, dst: str = "bar/httpbin", port: int = 80) -> Connection:
    return Connection(src_identity=src, src_ip="10.9.9.9", dst=_wl(reg, dst), dst_port=port)


def P(name: str, action: str, sources: tuple[str, ...] = (), ports: tuple[int, ...] = (), ns: str = "bar") -> Policy:
    return Policy(name=name, namespace=ns, action=action, sources=sources, ports=ports)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def a2a() -> Registry:
    return build_registry(build_plan(load_topology("ambient-to-ambient")))


# ---- semantics --------------------------------------------------------------------------------------
def test_no_policy_allows_and_registry_without_policies_gets_allowall(a2a: Registry) -> None:
    assert a2a.policies == []
    assert isinstance(for_registry(a2a), AllowAll)
    assert evaluate([], _conn(a2a, SLEEP)).allowed


def test_deny_matches_by_namespace_principal_star_and_port(a2a: Registry) -> None:
    c = _conn(a2a, SLEEP)
    assert not evaluate([P("d", "DENY", ("ns/foo",))], c).allowed
    assert evaluate([P("d", "DENY", ("ns/baz",))], c).allowed
    assert not evaluate([P("d", "DENY", (SLEEP,))], c).allowed
    assert not evaluate([P("d", "DENY", ("*",))], c).allowed
    assert not evaluate([P("d", "DENY", ("ns/foo",), (80,))], c).allowed
    assert evaluate([P("d", "DENY", ("ns/foo",), (8080,))], c).allowed
    assert evaluate([P("d", "DENY", ("ns/foo",), ns="foo")], c).allowed  # other destination namespace


def test_deny_wins_over_allow_and_names_the_policy(a2a: Registry) -> None:
    v = evaluate([P("ok", "ALLOW", ("ns/foo",)), P("no", "DENY", (SLEEP,))], _conn(a2a, SLEEP))
    assert (v.allowed, v.policy, v.reason) == (False, "no", "deny-policy")


def test_any_allow_makes_it_allowlist(a2a: Registry) -> None:
    pols = [P("only-foo", "ALLOW", ("ns/foo",))]
    v = evaluate(pols, _conn(a2a, SLEEP))
    assert (v.allowed, v.policy) == (True, "only-foo")
    v = evaluate(pols, _conn(a2a, OTHER))
    assert (v.allowed, v.policy, v.reason) == (False, "only-foo", "no-allow-match")
    # a plaintext caller has no identity: it matches no principal or namespace rule
    assert not evaluate(pols, _conn(a2a, None)).allowed
    # ...but an ALLOW with no sources is "anyone", plaintext included
    assert evaluate([P("all", "ALLOW")], _conn(a2a, None)).allowed
    # an ALLOW only for port 8080 leaves port 80 closed
    assert not evaluate([P("p", "ALLOW", ("ns/foo",), (8080,))], _conn(a2a, SLEEP)).allowed


# ---- topology -> registry --------------------------------------------------------------------------
def test_topology_policies_reach_the_registry_and_survive_json(tmp_path: Path) -> None:
    reg = _reg_with(tmp_path, """\
policies:
  - {name: deny-foo, namespace: bar, action: DENY, from: ["ns/foo", "cluster.local/ns/baz/sa/x"], to_ports: [80]}
  - {name: allow-any, namespace: foo, from: ["*"]}
""")
    assert reg.policies == [P("deny-foo", "DENY", ("ns/foo", "spiffe://cluster.local/ns/baz/sa/x"), (80,)),
                            P("allow-any", "ALLOW", ("*",), ns="foo")]
    assert Registry.from_json(reg.to_json()).policies == reg.policies
    assert isinstance(for_registry(reg), PolicyAuthorizer)


def test_the_plan_carries_the_policies_through_plan_json(tmp_path: Path) -> None:
    """The registry takes policies from the plan (as saved in plan.json), not from the topology
    file, which may have changed or gone since ``netlab up``."""
    import json

    from netlab.kernel.ledger import plan_json
    from netlab.plan.types import Plan

    f = tmp_path / "a2a-pol.yaml"
    f.write_text((topologies_dir() / "ambient-to-ambient.yaml").read_text() + """\
policies:
  - {name: deny-foo, namespace: bar, action: DENY, from: ["cluster.local/ns/foo/sa/sleep"], to_ports: [80]}
""")
    plan = build_plan(load_topology(f), source=str(f))
    f.unlink()
    saved = Plan.from_dict(json.loads(plan_json(plan)))
    assert saved == plan
    assert build_registry(saved).policies == [P("deny-foo", "DENY", (SLEEP,), (80,))]
    from netlab.plan.render import render_text
    assert f"bar/deny-foo               DENY  from {SLEEP} to 80" in render_text(saved)


@pytest.mark.parametrize("bad, needle", [
    ("[{name: x, namespace: nope, action: DENY}]", "namespace 'nope' is not defined"),
    ("[{name: x, namespace: bar, action: REJECT}]", "policies[0].action"),
    ("[{name: x, namespace: bar, from: [foo]}]", "must be a SPIFFE principal"),
    ("[{name: x, namespace: bar, to_ports: [0]}]", "port 0"),
    ("[{name: x, namespace: bar}, {name: x, namespace: bar}]", "duplicate policy 'bar/x'"),
    ("[{name: x, namespace: bar, rules: []}]", "unknown key"),
])
def test_bad_policies_are_one_line_topology_errors(tmp_path: Path, bad: str, needle: str) -> None:
    with pytest.raises(TopologyError) as e:
        _reg_with(tmp_path, f"policies: {bad}\n")
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---- route verdicts ----------------------------------------------------------------------------------
def test_inbound_hbone_deny_is_401_and_allow_passes(a2a: Registry) -> None:
    dst = _wl(a2a, "bar/httpbin")
    deny = PolicyAuthorizer([P("deny-foo", "DENY", ("ns/foo",))])
    d = plan_inbound(a2a, dst.node, dst.ip, "10.0.1.5", (SLEEP,), (dst.ip, 80), None, authz=deny)
    assert d == Reject("Denied", 401)
    assert deny.last is not None and deny.last.policy == "deny-foo"
    d = plan_inbound(a2a, dst.node, dst.ip, "10.0.1.5", (OTHER,), (dst.ip, 80), None, authz=deny)
    assert isinstance(d, InboundRoute)


def test_plaintext_and_fast_path_denies_are_refusals(a2a: Registry) -> None:
    local = _wl(a2a, "bar/httpbin-local")
    sleep = _wl(a2a, "foo/sleep")
    assert local.node == sleep.node
    deny = PolicyAuthorizer([P("deny-foo", "DENY", ("ns/foo",))])
    d = plan_outbound(a2a, sleep.node, a2a.ztunnels[sleep.node], sleep.ip, (local.ip, 80), authz=deny)
    assert d == Reject("Denied")
    allow_foo = PolicyAuthorizer([P("only-foo", "ALLOW", ("ns/foo",))])
    d = plan_outbound(a2a, sleep.node, a2a.ztunnels[sleep.node], sleep.ip, (local.ip, 80), authz=allow_foo)
    assert isinstance(d, Route) and d.kind == "fast_path"
    # plaintext 15006: no identity -> an allow-list shuts it out
    d = plan_plaintext(a2a, local.node, a2a.ztunnels[local.node], "10.0.1.200", (local.ip, 80), authz=allow_foo)
    assert d == Reject("Denied")
