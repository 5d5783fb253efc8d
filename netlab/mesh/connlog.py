"""One structured line per connection leg, so `netlab trace` can join a proxy's two TCP legs.

A leg is what a proxy did with one accepted connection: where it came from (``src``), where the
client meant to go (``orig_dst``), the upstream connection it opened (``up_src`` -> ``up_dst``),
how (``proto``: tcp | hbone), who the peers were (``src_id``/``dst_id``), bytes each way and how it
ended. The downstream 4-tuple of one leg equals the upstream 4-tuple of the previous proxy's leg,
which is the join key. Lines are JSON, appended to ``<state>/conn/<component>.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Leg:
    component: str  # e.g. ztunnel-node-a, httpbin.bar-sidecar, waypoint.bar-2
    listener: str  # outbound:15001 | inbound:15006 | hbone:15008 | ...
    src: str  # downstream peer "ip:port"
    orig_dst: str  # "ip:port" the client meant (VIP or pod), or the CONNECT authority
    local: str = ""  # downstream local "ip:port" as accepted
    up_src: str = ""  # upstream "ip:port" we connected from
    up_dst: str = ""  # upstream "ip:port" we connected to
    proto: str = "tcp"  # upstream protocol: tcp | hbone
    authority: str = ""  # HBONE :authority sent or received
    src_id: str = ""  # SPIFFE identity of the source workload
    dst_id: str = ""  # SPIFFE identity of the destination (or waypoint)
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    outcome: str = "ok"  # ok | reset | refused | 400 | 401 | 404 | 503 | error:<text>
    start: float = field(default_factory=time.time)
    duration_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self, outcome: str | None = None) -> "Leg":
        if outcome is not None:
            self.outcome = outcome
        self.duration_ms = round((time.time() - self.start) * 1000, 3)
        return self


def addr(a: Any) -> str:
    """``("10.0.1.3", 4242)`` -> ``"10.0.1.3:4242"``."""
    if not a:
        return ""
    return f"{a[0]}:{a[1]}"


class ConnLog:
    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path else None
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, leg: Leg) -> None:
        if self._fd is None:
            return
        d = asdict(leg)
        d["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(leg.start)) + f".{int(leg.start * 1000) % 1000:03d}Z"
        if not d["extra"]:
            del d["extra"]
        os.write(self._fd, (json.dumps(d, separators=(",", ":")) + "\n").encode())  # one write: atomic append

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_legs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
