"""Process identity from /proc: a PID alone is not an identity, PID + start time is.

Every record the runtime writes (procs.json, supervisor.json) pairs a PID with field 22 of
``/proc/PID/stat`` (start time in clock ticks since boot). Before signalling a PID read back
from a file we compare both, so a recycled PID belonging to some unrelated process is never
killed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses; everything after the last ')' is fixed.
    rest = raw[raw.rindex(")") + 2:].split()
    return rest  # rest[0] is field 3 (state); field N is rest[N - 3]


def starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if the process does not exist."""
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def state(pid: int) -> str | None:
    f = _stat_fields(pid)
    return f[0] if f else None


def alive(pid: int | None, start: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, still has start time ``start``."""
    if not pid:
        return False
    f = _stat_fields(pid)
    if not f or f[0] in ("Z", "X"):
        return False
    return start is None or int(f[19]) == start


def kill_checked(pid: int, start: int | None, sig: int, group: bool = False) -> bool:
    """Signal ``pid`` (or its process group) only if it is still the process we recorded."""
    if not alive(pid, start):
        return False
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(procs: Iterable[tuple[int, int | None]], timeout: float, interval: float = 0.01) -> list[int]:
    """Poll until none of (pid, starttime) is alive; returns the PIDs still alive at timeout."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p, s in procs if alive(p, s)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(interval)


def terminate(procs: Iterable[tuple[int, int | None]], grace: float = 2.0, group: bool = True) -> list[int]:
    """SIGTERM, wait up to ``grace`` seconds, SIGKILL leftovers. Returns PIDs that got SIGKILL."""
    procs = list(procs)
    for pid, st in procs:
        kill_checked(pid, st, signal.SIGTERM, group)
    left = set(wait_gone(procs, grace))
    killed = []
    for pid, st in procs:
        if pid in left and kill_checked(pid, st, signal.SIGKILL, group):
            killed.append(pid)
    wait_gone([(p, s) for p, s in procs if p in left], 1.0)
    return killed
