"""Destroy a lab from its ledger alone (no plan, no topology, no live apply process needed).

Order: stop recorded processes (they hold sockets in the lab's namespaces), delete recorded
namespaces (which takes every device, address, route, ip rule, iptables rule and ipset inside
with it: the lab has nothing in the root namespace) while the recorded files go, then the
directories apply made for them (plus ``/etc/netns/<netns>`` of a namespace it deleted, when
empty), then the ledger directory.

Only what this lab provably made is removed. A netns is deleted only if the namespace now at
its name has the cookie the ledger recorded for it (apply records it from inside the new
namespace before the name is taken, see :func:`netlab.netns.new_netns`), and it is unmounted
through the fd its cookie was read from; a file or a directory only if its device and inode
are the recorded ones. Anything else under a recorded
name -- a name this lab only intended, taken since by another lab -- is left in place and
listed in ``Report.kept``. The one unrecorded thing destroy removes is an empty placeholder
file at a recorded netns name (a creation killed between taking the name and mounting onto it).
Processes are signalled through a pidfd only when their start time is the recorded one.

Idempotent and tolerant: an intent whose object never came to exist (apply killed between
"intent" and "create"), or whose name the kernel refuses (too long), is skipped. One object
that cannot be removed never stops the others: its error is listed, the ledger is kept so a
second destroy can finish the job, and the plan file goes (the lab is no longer up, so commands
that pick "the lab that is up" ignore it). Netns deletion itself is asynchronous in the kernel:
the name is gone when this returns, the memory is reclaimed by the kernel's cleanup worker
shortly after.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import select
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import netns as ns
from netlab.kernel.ledger import LabBusyError, list_labs, locked_by, pid_alive, proc_starttime, read_entries, read_lock
from netlab.state import StateDir

__all__ = ["Report", "destroy", "list_labs", "lab_is_up", "stop_processes"]

ETC_NETNS = Path("/etc/netns")
_NO_SUCH_NAME = (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR)  # nothing there, or cannot be
#: the ledger lines destroy reads (processes, failed intents, directories made, the intents of
#: namespaces and files: the types it removes by name); the others, ~30,000 in a 1,000-pod lab's
#: ledger, are key-only intents of what goes with its namespace and notes, and parsing them all
#: was a quarter of `down`
_READS = (b'"process"', b'"failed"', b'"mkdir"', b'"Netns"', b'"File"')
_READS_RE = re.compile(b"|".join(re.escape(n) for n in _READS))  # one pass per line, not one per needle


@dataclass
class Report:
    lab: str
    existed: bool = True
    processes_stopped: list[str] = field(default_factory=list)
    processes_killed: list[str] = field(default_factory=list)  # needed SIGKILL
    netns_deleted: list[str] = field(default_factory=list)
    files_removed: list[str] = field(default_factory=list)
    dirs_removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # at a recorded name, but not this lab's (or unreadable records)
    errors: list[str] = field(default_factory=list)  # this lab's, and could not be removed


def _failed_keys(entries: list[dict[str, Any]]) -> set[Any]:
    return {e.get("key") for e in entries if e.get("op") == "failed"}


def _intents(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    failed = _failed_keys(entries)
    seen: set[str] = set()
    out = []
    for e in entries:
        key = e.get("key")
        if e.get("op") == "intent" and isinstance(key, str) and key not in failed and key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _read_ledger(lab: str) -> list[dict[str, Any]]:
    """The entries of the ledger's lines destroy reads (``_READS``), in the ledger's order."""
    return read_entries(lab, matching=_READS_RE)


def _same_inode(path: str, e: dict[str, Any], want: int) -> bool | None:
    """None if nothing is at ``path``; else whether it is the inode ``e`` recorded (``dev``,
    ``ino``), of file type ``want`` (stat.S_IFREG / S_IFDIR). A symlink never is."""
    try:
        st = os.lstat(path)
    except OSError as ex:
        if ex.errno in _NO_SUCH_NAME:
            return None
        raise
    return stat.S_IFMT(st.st_mode) == want and (st.st_dev, st.st_ino) == (e.get("dev"), e.get("ino"))


def destroy(lab: str, *, force: bool = False) -> Report:
    """Tear ``lab`` down from its ledger. Refuses (LabBusyError) while another live process is
    applying it, unless ``force``; with ``force`` the ledger goes even if something could not be
    removed."""
    rep = Report(lab)
    sd = StateDir.of(lab)
    d = sd.path
    if not d.exists():
        rep.existed = False
        return rep
    busy = locked_by(lab)
    if busy and not force:
        raise LabBusyError(f"lab {lab!r} is being brought up or repaired by pid {busy}; wait for it to finish "
                           f"(or stop it), then run `netlab down {lab}`")
    try:
        entries = _read_ledger(lab)
    except OSError as err:
        rep.errors.append(f"ledger {d}: {err}")
        entries = []
    intents = _intents(entries)

    procs = []
    for p in reversed([e for e in entries if e.get("op") == "process"]):
        try:
            procs.append((str(p["name"]), int(p["pid"]), int(p["starttime"])))
        except (KeyError, TypeError, ValueError):
            rep.kept.append(f"an unreadable process record in the ledger ({p})")
    stopped, killed, errs = stop_processes(procs)
    rep.processes_stopped, rep.processes_killed = stopped, killed
    rep.errors += errs

    # a name made more than once (a pod removed and made again live: `netlab waypoint rm`, `add`)
    # has one cookie per making; the namespace there now is ours if it has any of them
    recorded: dict[str, list[Any]] = {}
    failed = _failed_keys(entries)
    for e in entries:
        if e.get("op") == "intent" and e.get("type") == "Netns" and e.get("key") not in failed:
            recorded.setdefault(str((e.get("obj") or {}).get("name", "")), []).append(e.get("cookie"))
    todo = [(str((e.get("obj") or {}).get("name", "")), e.get("cookie"))
            for e in reversed([e for e in intents if e.get("type") == "Netns"])]
    # files go while the namespaces do (nothing of one needs the other): the netns threads
    # spend most of their time waiting in the kernel
    files = Report(lab)
    outcomes = _destroy_all_netns(todo, recorded, meanwhile=lambda: _remove_files(intents, files))
    deleted: list[str] = []
    for (name, _), (deleted_it, kept, error) in zip(todo, outcomes, strict=True):
        if deleted_it:
            rep.netns_deleted.append(name)
            deleted.append(name)
        if kept:
            rep.kept.append(kept)
        if error:
            rep.errors.append(error)
    rep.files_removed = files.files_removed
    rep.kept += files.kept
    rep.errors += files.errors

    # paths as the ledger has them (str: a Path per file and directory was a fifth of destroy)
    dirs = {str(e.get("path")): e for e in entries if e.get("op") == "mkdir" and "ino" in e}
    etc = {f"{ETC_NETNS}/{n}" for n in deleted}  # a namespace's own config dir, of a namespace that was ours
    for dd in sorted(set(dirs) | etc, key=lambda p: p.rstrip("/").count("/"), reverse=True):
        with contextlib.suppress(OSError):  # not empty (not only ours), or gone
            if dd in dirs and not _same_inode(dd, dirs[dd], stat.S_IFDIR):
                continue
            os.rmdir(dd)
            rep.dirs_removed.append(dd)

    if rep.errors and not force:
        with contextlib.suppress(OSError):  # no longer up: keep only what a second destroy needs
            sd.plan.unlink()
        return rep
    shutil.rmtree(d, ignore_errors=True)
    return rep


#: netns unmounted at once: each umount waits for an RCU grace period (the kernel's
#: namespace_unlock), 0.05-0.5 ms apiece, longer while the kernel frees the namespaces already
#: deleted on the other CPU; the waits of concurrent umounts end at the same grace period
#: (16 and 48 threads measured alike on a loaded machine, 4 slower)
_NETNS_THREADS = 32
_NETNS_CHUNK = 512  # namespaces held open at once (an fd each), under the usual 1024-fd limit

Outcome = tuple[bool, str | None, str | None]  # (deleted, why it was kept, error)


def _destroy_all_netns(todo: list[tuple[str, Any]], recorded: dict[str, list[Any]],
                       meanwhile: Callable[[], None] = lambda: None) -> list[Outcome]:
    """Delete each (name, cookie) of ``todo`` whose namespace is the one recorded, while this
    thread runs ``meanwhile``; the outcomes in ``todo``'s order.

    This thread opens each name and checks the cookie of what it opened (:func:`_look`); the
    mounts of those that are ours are unmounted through their fds (:func:`ns.unmount_netns_fd`:
    the namespace checked, not whatever is at the name by then) by ``_NETNS_THREADS`` threads,
    which do nothing else: a thread that returns from a system call waits for the GIL, and
    with 32 of them doing the whole job (open, ioctl, close, umount, unlink) they waited more
    than the kernel. Then this thread closes the fds and removes the names."""
    out: list[Outcome] = [(False, None, None)] * len(todo)
    chunk = max(16, min(_NETNS_CHUNK, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2))
    pending: Callable[[], None] | None = meanwhile
    nxt = 0
    while nxt < len(todo):
        held: list[tuple[int, int]] = []  # (index in todo, fd) of the namespaces that are ours
        while nxt < len(todo) and len(held) < chunk:
            i = nxt
            name, cookie = todo[i]
            try:
                out[i], fd = _look(name, cookie, recorded)
            except OSError as ex:
                if ex.errno in (errno.EMFILE, errno.ENFILE) and held:
                    break  # out of fds (a caller holding many): unmount those held, then look again
                out[i], fd = (False, None, f"netns {name}: {ex.strerror or ex}"), None
            nxt += 1
            if fd is not None:
                held.append((i, fd))
        errors: dict[int, str] = {}
        try:
            _unmount_all([(i, fd, todo[i][0]) for i, fd in held], errors, pending)
            pending = None
        finally:
            for i, fd in held:
                os.close(fd)
                name = todo[i][0]
                if i in errors:
                    out[i] = (False, None, errors[i])
                    continue
                try:
                    os.unlink(ns.netns_path(name))  # the file the mount was on
                except FileNotFoundError:
                    pass
                except OSError as ex:
                    out[i] = (False, None, f"netns {name}: {ex.strerror or ex}")
                    continue
                out[i] = (True, None, None)
    if pending is not None:
        pending()
    return out


def _unmount_all(held: list[tuple[int, int, str]], errors: dict[int, str],
                 meanwhile: Callable[[], None] | None) -> None:
    """Unmount each (index, fd, name) of ``held`` from a few threads, while this one runs
    ``meanwhile``; what could not be unmounted goes to ``errors`` by index."""

    def run(first: int, step: int) -> None:
        for j in range(first, len(held), step):
            i, fd, name = held[j]
            try:
                ns.unmount_netns_fd(fd, name)
            except OSError as ex:
                errors[i] = f"netns {name}: {ex.strerror or ex}"

    n = min(_NETNS_THREADS, len(held))
    threads = [threading.Thread(target=run, args=(k, n), name=f"netns-destroy-{k}", daemon=True)
               for k in range(n)]
    for t in threads:
        t.start()
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        for t in threads:
            t.join()


def _remove_files(intents: list[dict[str, Any]], out: Report) -> None:
    """Remove each recorded file that is still the inode this lab made (see the module docstring)."""
    for e in reversed(intents):
        if e.get("type") != "File":
            continue
        path = str((e.get("obj") or {}).get("path", ""))
        try:
            ours = _same_inode(path, e, stat.S_IFREG)
            if ours is None:
                continue
            if not ours:
                out.kept.append(f"file {path} (not the file this lab made)")
                continue
            os.unlink(path)
            out.files_removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as ex:
            out.errors.append(f"file {path}: {ex.strerror or ex}")


def _look(name: str, cookie: Any, recorded: dict[str, list[Any]]) -> tuple[Outcome, int | None]:
    """What is at ``name``, against the ``cookie`` the ledger recorded for it: (the outcome, and
    an open fd of the namespace if it is this lab's, to unmount) -- ours only if it has that
    cookie (or, for a name made more than once, any cookie recorded for it)."""
    if not name or "/" in name or name in (".", ".."):
        return (False, None, None), None  # a malformed record: no namespace can have that name
    try:
        fd = ns.open_netns(name)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        fd, now = None, ns.NOT_A_NETNS  # a symlink: never ours
    else:
        if fd is None:
            return (False, None, None), None  # never made (killed before), already gone, or a name that cannot exist
        try:
            now = ns.fd_cookie(fd)
        except BaseException:
            os.close(fd)
            raise
    if now != ns.NOT_A_NETNS and len(recorded.get(name, ())) > 1 and now in recorded[name]:
        cookie = now
    if now == ns.NOT_A_NETNS or cookie is None or now != cookie:
        if fd is not None:
            os.close(fd)
    if now == ns.NOT_A_NETNS:
        if cookie is not None and ns.is_placeholder(name):  # see the module docstring
            ns.delete_netns(name)
            return (True, None, None), None
        return (False, f"netns {name} (not a namespace)", None), None
    if cookie is None:
        return (False, f"netns {name} (the ledger has no identity for it: not provably this lab's)", None), None
    if now != cookie:
        owner = owner_of(name)
        return (False, f"netns {name} (not the namespace this lab made: "
                + (f"lab {owner!r} made it" if owner else "another lab or user has that name now") + ")", None), None
    return (False, None, None), fd


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


def owner_of(netns: str) -> str | None:
    """The lab whose ledger records the namespace now at ``netns`` (by cookie), if any."""
    now = ns.netns_id(netns)
    if not now:
        return None
    for lab in list_labs():
        with contextlib.suppress(OSError):
            if any(e.get("type") == "Netns" and e.get("cookie") == now and (e.get("obj") or {}).get("name") == netns
                   for e in read_entries(lab, containing=b'"Netns"')):
                return lab
    return None


def lab_is_up(lab: str) -> bool:
    """A finished apply (``done`` in the ledger, no live lock) whose namespaces all exist and
    are still the ones it made."""
    if not StateDir.of(lab).path.is_dir():
        return False
    entries = read_entries(lab)
    if not any(e.get("op") == "done" for e in entries):
        return False
    lock = read_lock(lab)
    if lock and pid_alive(*lock):
        return False
    return all(ns.netns_id(e["obj"]["name"]) == e.get("cookie") for e in _intents(entries) if e.get("type") == "Netns")
