"""Destroy a lab from its ledger alone (no plan, no topology, no live apply process needed).

Order: stop recorded processes (they hold sockets in the lab's namespaces), delete recorded
namespaces (which takes every device, address, route, ip rule, iptables rule and ipset inside
with it: the lab has nothing in the root namespace), remove recorded files and the directories
apply made for them (plus ``/etc/netns/<netns>`` when empty), then the ledger directory.

Idempotent and tolerant: an intent whose object never came to exist (apply killed between
"intent" and "create") is simply skipped. Intents marked ``failed`` (the name belonged to
someone else) are never touched; nothing that is not in the ledger is ever deleted. Netns
deletion itself is asynchronous in the kernel: the name is gone when this returns, the
memory is reclaimed by the kernel's cleanup worker shortly after.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab.kernel import ns
from netlab.kernel.ledger import (LabBusyError, lab_dir, list_labs, pid_alive, proc_starttime, read_entries,
                                  read_lock)

__all__ = ["Report", "destroy", "list_labs", "lab_is_up", "stop_processes"]

ETC_NETNS = Path("/etc/netns")


@dataclass
class Report:
    lab: str
    existed: bool = True
    processes_stopped: list[str] = field(default_factory=list)
    processes_killed: list[str] = field(default_factory=list)  # needed SIGKILL
    netns_deleted: list[str] = field(default_factory=list)
    files_removed: list[str] = field(default_factory=list)
    dirs_removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _intents(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    failed = {e.get("key") for e in entries if e.get("op") == "failed"}
    seen: set[str] = set()
    out = []
    for e in entries:
        if e.get("op") == "intent" and e.get("key") not in failed and e.get("key") not in seen:
            seen.add(e["key"])
            out.append(e)
    return out


def destroy(lab: str, *, force: bool = False) -> Report:
    """Tear ``lab`` down from its ledger. Refuses (LabBusyError) while another live process is
    applying it, unless ``force``."""
    rep = Report(lab)
    d = lab_dir(lab)
    if not d.exists():
        rep.existed = False
        return rep
    lock = read_lock(lab)
    if lock and lock[0] != os.getpid() and pid_alive(*lock) and not force:
        raise LabBusyError(f"lab {lab!r} is being applied by pid {lock[0]}; wait for it or use force")
    entries = read_entries(lab)
    intents = _intents(entries)

    procs = [e for e in entries if e.get("op") == "process"]
    stopped, killed, errs = stop_processes([(p["name"], int(p["pid"]), int(p["starttime"])) for p in reversed(procs)])
    rep.processes_stopped, rep.processes_killed = stopped, killed
    rep.errors += errs

    netns = [e["obj"]["name"] for e in intents if e.get("type") == "Netns"]
    for name in reversed(netns):
        try:
            if ns.delete_netns(name):
                rep.netns_deleted.append(name)
        except OSError as e:
            rep.errors.append(f"netns {name}: {e}")

    for e in reversed(intents):
        if e.get("type") != "File":
            continue
        path = Path(e["obj"]["path"])
        try:
            path.unlink()
            rep.files_removed.append(str(path))
        except FileNotFoundError:
            pass
        except OSError as ex:
            rep.errors.append(f"file {path}: {ex}")
    dirs = [Path(e["path"]) for e in entries if e.get("op") == "mkdir"]
    dirs += [ETC_NETNS / n for n in netns]
    for dd in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(FileNotFoundError, OSError):  # not empty: not only ours
            dd.rmdir()
            rep.dirs_removed.append(str(dd))

    if rep.errors and not force:
        return rep  # keep the ledger so a second destroy can finish the job
    shutil.rmtree(d, ignore_errors=True)
    return rep


def stop_processes(procs: list[tuple[str, int, int]], timeout: float = 2.0) -> tuple[list[str], list[str], list[str]]:
    """SIGTERM each (name, pid, starttime), wait up to ``timeout`` s, SIGKILL the rest.

    A pidfd is opened first and the starttime checked *after* that, so the signal can only
    reach the process we recorded, never a later process that reused its PID.
    """
    live: dict[int, tuple[str, int]] = {}  # pidfd -> (name, pid)
    errors: list[str] = []
    for name, pid, st in procs:
        try:
            fd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            continue
        if proc_starttime(pid) != st:
            os.close(fd)
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
            live[fd] = (name, pid)
        except ProcessLookupError:
            os.close(fd)
    stopped = list(_wait(live, timeout))
    killed = []
    for fd, (name, _) in list(live.items()):
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        killed.append(name)
    _wait(live, 2.0)
    for fd, (name, pid) in live.items():
        errors.append(f"process {name} (pid {pid}) survived SIGKILL")
        os.close(fd)
    return stopped, killed, errors


def _wait(live: dict[int, tuple[str, int]], timeout: float) -> list[str]:
    """Wait until the pidfds in ``live`` report exit; remove and close those, return their names."""
    out = []
    deadline = time.monotonic() + timeout
    while live:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        p = select.poll()
        for fd in live:
            p.register(fd, select.POLLIN)
        for fd, _ in p.poll(left * 1000):
            name, _ = live.pop(fd)
            os.close(fd)  # not reaped here: if it is our child, its Popen owns the exit status
            out.append(name)
    return out


def lab_is_up(lab: str) -> bool:
    """A finished apply (``done`` in the ledger, no live lock) whose namespaces all exist."""
    if not lab_dir(lab).is_dir():
        return False
    entries = read_entries(lab)
    if not any(e.get("op") == "done" for e in entries):
        return False
    lock = read_lock(lab)
    if lock and pid_alive(*lock):
        return False
    existing = set(ns.list_netns())
    return all(e["obj"]["name"] in existing for e in _intents(entries) if e.get("type") == "Netns")
