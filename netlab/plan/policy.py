"""The plan's L4 AuthorizationPolicy, in a module of its own: the mesh's registry (which every
proxy loads at start) needs this one type, and importing :mod:`netlab.plan.types` (19
dataclasses) cost a sidecar's cold start ~30 ms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PolicyInfo:
    """An L4 AuthorizationPolicy as ztunnel gets it (what istiod would push): for every workload
    of ``namespace``. ``sources``: SPIFFE IDs (``spiffe://`` form), ``ns/<namespace>`` or ``*``;
    empty = any source, plaintext too. ``ports``: destination target ports; empty = any."""

    name: str
    namespace: str
    action: Literal["ALLOW", "DENY"]
    sources: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
