"""Per-process resource figures of a running lab: RSS and TCP connections, read from /proc.

Connections are attributed to a process through its socket inodes (``/proc/<pid>/fd``) matched
against ``/proc/<pid>/net/tcp``, which shows the network namespace the process lives in — so a
sidecar's count is its own, not its pod's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from netlab.runtime import procfs
from netlab.state import StateDir

TCP_STATES = {"01": "established", "0A": "listen"}


@dataclass
class ProcStats:
    name: str
    kind: str
    pid: int
    rss_kib: int
    established: int
    listening: int
    fds: int
    node: str = ""


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _socket_inodes(pid: int) -> tuple[set[str], int]:
    inodes: set[str] = set()
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            n += 1
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes, n


def _tcp_counts(pid: int, inodes: set[str]) -> tuple[int, int]:
    est = lis = 0
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return 0, 0
    for line in lines:
        f = line.split()
        if len(f) > 9 and f[9] in inodes:
            state = TCP_STATES.get(f[3])
            est += state == "established"
            lis += state == "listen"
    return est, lis


def process_stats(state_dir: str | os.PathLike[str], node_of: dict[str, str] | None = None) -> list[ProcStats]:
    """Figures for every live process the lab's supervisor runs (its process records)."""
    p = StateDir(Path(state_dir)).procs
    if not p.exists():
        return []
    out = []
    for name, rec in sorted(json.loads(p.read_text()).items()):
        pid = rec.get("pid")
        if not pid or rec.get("state") != "running" or not procfs.alive(pid, rec.get("starttime")):
            continue  # (a dead supervisor's last records name dead pids: `netlab status` shows those)
        inodes, nfds = _socket_inodes(pid)
        est, lis = _tcp_counts(pid, inodes)
        out.append(ProcStats(name=name, kind=rec.get("kind", ""), pid=pid, rss_kib=_rss_kib(pid), established=est,
                             listening=lis, fds=nfds, node=(node_of or {}).get(name, "")))
    return out


def as_dicts(stats: list[ProcStats]) -> list[dict[str, object]]:
    return [asdict(s) for s in stats]
