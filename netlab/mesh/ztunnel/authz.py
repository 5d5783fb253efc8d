"""Authorization hook (ztunnel ``rbac.rs``). 1.18 applies it on inbound HBONE (unless the caller is
the destination's waypoint), on inbound plaintext, and on the same-node fast path. A deny is a
401 on HBONE and a closed connection elsewhere.

Only the hook lives here for now: :class:`AllowAll`. Policies (source identity / namespace ->
destination workload / port) plug in by implementing :class:`Authorizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from netlab.mesh.registry import Workload


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
