"""Authorization (ztunnel ``rbac.rs``). 1.18 applies it on inbound HBONE (unless the caller is
the destination's waypoint), on inbound plaintext, and on the same-node fast path. A deny is a
401 on HBONE and a closed connection elsewhere.

:class:`AllowAll` is ztunnel with no AuthorizationPolicy. :class:`PolicyAuthorizer` evaluates the
topology's ``policies:`` (carried in the registry) with Istio's L4 semantics:

1. a DENY policy of the destination's namespace that matches (source and port) -> deny;
2. else, if the destination's namespace has any ALLOW policy: allow only if one matches;
3. else allow.

A source matches a policy when ``sources`` is empty, or one entry matches the caller's identity:
the exact SPIFFE ID, ``ns/<namespace>`` (the identity's namespace), or ``*`` (any identity). A
plaintext caller has no identity, so it only matches policies with no ``sources``. Ports are the
destination's target port; no ``ports`` matches every port.

The verdict of the last decision is kept in :attr:`PolicyAuthorizer.last` so the proxy can write
the deciding policy's name into the connection-log leg (``extra.policy``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from netlab.mesh.registry import Policy, Registry, Workload


@dataclass(frozen=True)
class Connection:
    """What RBAC sees of one connection (ztunnel ``rbac::Connection``)."""

    src_identity: str | None  # None for plaintext callers
    src_ip: str
    dst: Workload
    dst_port: int


class Authorizer(Protocol):
    def allow(self, conn: Connection) -> bool: ...


class AllowAll:
    """No policies: everything is allowed (ztunnel with no AuthorizationPolicy)."""

    def allow(self, conn: Connection) -> bool:
        return True


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    policy: str | None  # the deciding policy: the matching DENY/ALLOW; None when no policy decided
    reason: str  # "deny-policy" | "allow-policy" | "no-allow-match" | "no-policy"


def _namespace_of(identity: str) -> str | None:
    """``spiffe://td/ns/<ns>/sa/<sa>`` -> ``<ns>``."""
    parts = identity.removeprefix("spiffe://").split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[2]
    return None


def source_matches(p: Policy, identity: str | None) -> bool:
    if not p.sources:
        return True
    if identity is None:
        return False
    for s in p.sources:
        if s == "*" or s == identity:
            return True
        if s.startswith("ns/") and _namespace_of(identity) == s[3:]:
            return True
    return False


def policy_matches(p: Policy, conn: Connection) -> bool:
    if p.namespace != conn.dst.namespace:
        return False
    if p.ports and conn.dst_port not in p.ports:
        return False
    return source_matches(p, conn.src_identity)


def evaluate(policies: Iterable[Policy], conn: Connection) -> Verdict:
    mine = [p for p in policies if p.namespace == conn.dst.namespace]
    for p in mine:
        if p.action == "DENY" and policy_matches(p, conn):
            return Verdict(False, p.name, "deny-policy")
    allows = [p for p in mine if p.action == "ALLOW"]
    if not allows:
        return Verdict(True, None, "no-policy")
    for p in allows:
        if policy_matches(p, conn):
            return Verdict(True, p.name, "allow-policy")
    return Verdict(False, ",".join(p.name for p in allows), "no-allow-match")


class PolicyAuthorizer:
    """Enforces the registry's policies (see the module docstring)."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.policies = tuple(policies)
        self.last: Verdict | None = None

    @classmethod
    def from_registry(cls, reg: Registry) -> PolicyAuthorizer:
        return cls(reg.policies)

    def decide(self, conn: Connection) -> Verdict:
        self.last = evaluate(self.policies, conn)
        return self.last

    def allow(self, conn: Connection) -> bool:
        return self.decide(conn).allowed


def for_registry(reg: Registry) -> Authorizer:
    """ztunnel's authorizer for a lab: AllowAll when the topology has no policies."""
    return PolicyAuthorizer.from_registry(reg) if reg.policies else AllowAll()
