"""Hop contracts: does an observed trace follow the hops a topology path promises?

Why a contract is matched as an ordered *subsequence*: a trace sees more than the seed article
numbers (the fabric crossing, the Geneve outer frame on the ztunnel veth, the loopback echo of a
redirected SYN). The seed's hops must all be there, in that order; what lies between is shown
but not judged. The first expected hop that cannot be found after the previous match is the
divergence, reported next to the closest observation (same namespace first), because "expected
istioout out, observed eth0 out on node-a" is the sentence that explains a broken datapath.

Pure code (no root, no kernel): unit-tested in ``tests/unit/test_contract.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from netlab.plan.types import Plan
from netlab.topology.model import Hop, RequestPath
from netlab.verify.hops import ObservedHop


@dataclass
class Divergence:
    expected: Hop
    observed: ObservedHop | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"expected": self.expected.model_dump(exclude_defaults=True),
                "observed": self.observed.to_dict() if self.observed else None, "reason": self.reason}

    def __str__(self) -> str:
        obs = self.observed.short() if self.observed else "nothing"
        return f"hop ({self.expected.n}) diverged: expected {describe(self.expected)}; observed {obs} ({self.reason})"


@dataclass
class MatchResult:
    ok: bool
    matched: list[tuple[Hop, ObservedHop]]
    divergence: Divergence | None


def describe(h: Hop) -> str:
    """One line for an expected hop, in the contract's own words."""
    if h.absent:
        return "no " + describe(h.model_copy(update={"absent": False}))
    if h.listener:
        s = f"{h.at} listener {h.listener}"
    else:
        s = f"{h.at} {h.iface}" + (f" {h.dir}" if h.dir else "")
    if h.port is not None:
        s += f" :{h.port}"
    if h.rules:
        s += " rules " + ", ".join(h.rules)
    if h.table is not None:
        s += f" table {h.table}"
    return s


def at_matches(expected: str, observed: str) -> bool:
    """``waypoint:bar-2`` matches any waypoint of namespace bar-2 (``waypoint:bar-2/waypoint``)."""
    if expected == observed:
        return True
    if expected.startswith("waypoint:") and "/" not in expected:
        return observed.startswith(expected + "/")
    return False


def mismatch(h: Hop, o: ObservedHop) -> str | None:
    """Why observed hop ``o`` does not satisfy expected hop ``h`` (None: it does)."""
    if not at_matches(h.at, o.at):
        return f"at {o.at}, not {h.at}"
    if h.listener is not None:
        if o.kind != "proxy":
            return "a packet, not a proxy"
        if o.listener_sym != h.listener:
            return f"listener {o.listener_sym}, not {h.listener}"
    else:
        if o.kind != "packet":
            return "a proxy, not a packet"
        if h.iface is not None and h.iface not in (o.iface_sym, o.iface):
            return f"iface {o.iface_sym}, not {h.iface}"
        if h.dir is not None and o.dir != h.dir:
            return f"direction {o.dir}, not {h.dir}"
    if h.port is not None and o.port != h.port:
        return f"port {o.port}, not {h.port}"
    missing = [r for r in h.rules if r not in o.rules]
    if missing:
        return "rule(s) " + ", ".join(missing) + " did not match" + (f" (matched: {', '.join(o.rules)})" if o.rules else "")
    if h.table is not None and o.table != h.table:
        return f"route table {o.table}, not {h.table}" if o.table is not None else f"{o.route or 'no route'}, not table {h.table}"
    return None


def match(expected: Sequence[Hop], observed: Sequence[ObservedHop]) -> MatchResult:
    """Greedy ordered-subsequence match; sets ``seed_n`` on the observed hops that matched."""
    for o in observed:
        o.seed_n = None
    pairs: list[tuple[Hop, ObservedHop]] = []
    cur = 0
    for h in expected:
        if h.absent:  # checked below, against the whole trace
            continue
        for i in range(cur, len(observed)):
            if mismatch(h, observed[i]) is None:
                observed[i].seed_n = h.n
                pairs.append((h, observed[i]))
                cur = i + 1
                break
        else:
            return MatchResult(False, pairs, _diverge(h, observed[cur:]))
    for h in expected:
        seen = next((o for o in observed if h.absent and mismatch(h, o) is None), None)
        if seen is not None:
            return MatchResult(False, pairs, Divergence(h, seen, "the contract says this hop does not happen"))
    return MatchResult(True, pairs, None)


def _diverge(h: Hop, rest: Sequence[ObservedHop]) -> Divergence:
    """The closest observation to an expected hop that never came: same place and kind, else
    same place, else the next hop observed at all."""
    if not rest:
        return Divergence(h, None, "the trace ended before this hop")
    same_kind = [o for o in rest if at_matches(h.at, o.at) and (o.kind == "proxy") == (h.listener is not None)]
    same_at = [o for o in rest if at_matches(h.at, o.at)]
    if h.iface is not None and same_kind:
        same_iface = [o for o in same_kind if h.iface in (o.iface_sym, o.iface)]
        best = (same_iface or same_kind)[0]
    else:
        best = (same_kind or same_at or list(rest))[0]
    return Divergence(h, best, mismatch(h, best) or "out of order")


def plan_contracts(plan: Plan) -> list[RequestPath]:
    """The request paths (hop contracts) as the plan carries them, so a trace checks what the lab
    was brought up with even if its topology file changed or moved since."""
    return [RequestPath.model_validate({
        "name": p.name, "from": p.from_, "to": p.to, "url": p.url, "expect_status": p.expect_status,
        "expect_body": p.expect_body, "source_seen": p.source_seen,
        "hops": [{k: v for k, v in dataclasses.asdict(h).items() if v is not None} for h in p.hops],
    }) for p in plan.paths]


def find_contract(paths: Sequence[RequestPath], *, name: str | None, src: str, dst: str) -> RequestPath | None:
    """The path named ``name``, else the one whose from/to equal the trace's (None if none)."""
    if name is not None:
        for p in paths:
            if p.name == name:
                return p
        raise KeyError(f"no path named {name!r} (paths: {', '.join(p.name for p in paths) or 'none'})")
    hits = [p for p in paths if p.from_ == src and _same_dst(p.to, dst)]
    return hits[0] if hits else None


def _same_dst(a: str, b: str) -> bool:
    def norm(x: str) -> str:
        host, _, port = x.partition(":")
        host = host.removesuffix(".svc.cluster.local").removesuffix(".svc")
        return f"{host}:{port or '80'}"
    return norm(a) == norm(b)
