"""What every program the lab supervises does: its fd limit, dying with its supervisor, its event
loop, and the ready line.

Shared by the proxies (ztunnel, sidecar, waypoint: :mod:`netlab.mesh.process`), the sample apps
(:mod:`netlab.apps`) and the supervisor's ``spawn`` (which runs :func:`raise_nofile` as root just
before a child drops its privileges). Imports nothing from netlab: it sits at the bottom of the
layers.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

#: The fd limit every lab process gets, soft and hard (capped by ``fs.nr_open``). A proxy holds
#: two sockets per proxied connection and, while a TCP relay runs, a dup of each; an inherited
#: ``ulimit -n 1024`` made a sidecar fail 1,745 of 2,000 concurrent connections with EMFILE.
NOFILE = 1 << 20
SUPERVISOR_PID_ENV = "NETLAB_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return NOFILE


def raise_nofile(want: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE: soft to the hard limit, and (where allowed: root) both to ``want``.

    The limit of whoever ran ``netlab up`` must not decide how many connections a proxy can
    hold. Returns the new soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = _nr_open()
    target = max(hard, min(want, _nr_open()))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):  # not privileged: the hard limit is as far as we may go
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def low_nofile_warning(floor: int = 16384) -> str | None:
    """What to tell the user when the fd limit stays low after :func:`raise_nofile` (a hard limit
    lowered by ``ulimit -n``, and no CAP_SYS_RESOURCE to raise it again), else None."""
    raise_nofile()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= floor:
        return None
    return (f"the open-file limit here is {hard} and cannot be raised (no CAP_SYS_RESOURCE): each proxy can "
            f"hold about {hard // 2} connections at once; run `up` from a shell with a higher `ulimit -n`")


def rearm_parent_death() -> None:
    """Ask for SIGTERM when the supervisor dies, and exit if it already has.

    ``spawn`` sets this before exec, but the kernel clears it when a program starts with a real
    gid other than its effective gid (how ``spawn`` starts uid-1337 processes, see
    ``netlab.runtime.spawn``), so the program sets it again itself.
    """
    want = os.environ.get(SUPERVISOR_PID_ENV, "")
    if not want.isdigit():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(want):
        raise SystemExit(f"netlab: supervisor (pid {want}) is gone; not starting")


def setup() -> int:
    """Both of the above; returns the soft fd limit."""
    rearm_parent_death()
    return raise_nofile()


def announce_ready(app: str, name: str, **fields: Any) -> None:
    """The supervisor's readiness contract: one JSON line with ``"event": "ready"`` on stdout,
    flushed, printed only once every listening socket is bound (so "ready" means "connect()
    will succeed"). It names the program (``app``), its instance (``name``) and its pid; the
    rest is the program's own (e.g. the bound ports, so a test can ask for port 0)."""
    rec = {"event": "ready", "app": app, "name": name, "pid": os.getpid(), **fields}
    sys.stdout.write(json.dumps(rec, separators=(",", ":")) + "\n")
    sys.stdout.flush()


#: What our programs import only once they run (the event loop, asyncio's default executor,
#: the IDNA codec a first name lookup loads): the supervisor imports these with the programs'
#: modules, so a forked child finds them loaded (~10 ms of CPU per ztunnel, x20 in a 20-node lab).
LATE_IMPORTS = ("uvloop", "concurrent.futures.thread", "encodings.idna")


def use_uvloop() -> bool:
    """New event loops are uvloop's when it is installed and ``NETLAB_NO_UVLOOP`` is not ``1``;
    returns whether they are."""
    if os.environ.get("NETLAB_NO_UVLOOP") == "1":
        return False
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` to its end on a new event loop (:func:`use_uvloop`); Ctrl-C in a terminal
    exits quietly, without a traceback."""
    use_uvloop()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
