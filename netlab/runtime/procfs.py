"""Process identity from /proc: a PID alone is not an identity, PID + start time is.

Every record the runtime writes (procs.json, supervisor.json) pairs a PID with field 22 of
``/proc/PID/stat`` (start time in clock ticks since boot). Before signalling a PID read back
from a file we compare both, so a recycled PID belonging to some unrelated process is never
killed.
"""

from __future__ import annotations

import os
import select
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
    """Wait until none of (pid, starttime) is alive; returns the PIDs still alive at timeout.

    Woken by each exit (a pidfd per process, opened before its start time is checked, so it is
    the process we recorded), not by polling /proc: `down` waits here for a lab's supervisor,
    and a poll interval is that much added to it. ``interval``: the poll of a process no pidfd
    could be opened for (a kernel without pidfd_open)."""
    fds: dict[int, int] = {}  # pidfd -> pid
    polled: list[tuple[int, int | None]] = []
    try:
        for pid, st in procs:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            except OSError:
                polled.append((pid, st))
                continue
            if alive(pid, st):
                fds[fd] = pid
            else:
                os.close(fd)
        deadline = time.monotonic() + timeout
        while True:
            polled = [(p, s) for p, s in polled if alive(p, s)]
            left = deadline - time.monotonic()
            if not (fds or polled) or left <= 0:
                return list(fds.values()) + [p for p, _ in polled]
            poll = select.poll()
            for fd in fds:
                poll.register(fd, select.POLLIN)
            wait = min(left, interval) if polled else left
            for fd, _ in poll.poll(wait * 1000):
                os.close(fd)
                del fds[fd]
    finally:
        for fd in fds:
            os.close(fd)


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
