"""The write-ahead ledger of a lab: what may exist in the kernel because netlab made it.

Layout under ``$NETLAB_RUN_DIR/<lab>/`` (default ``/run/netlab/<lab>/``):

- ``ledger.jsonl``: append-only JSON lines. An ``intent`` line (object key and type; and
  the object's fields for the types destroy reads them from: netns and files) is
  written with ``os.write`` on an ``O_APPEND`` fd *before* the object is created, so a SIGKILL
  between "created" and "recorded" cannot leak anything: destroy works from intents and
  tolerates objects that never came to exist. ``failed`` marks an intent whose creation was
  refused because the name was taken by someone else (destroy must not touch it); ``mkdir``
  records directories apply created; ``process`` records a runtime process with its
  ``/proc/<pid>/stat`` starttime so a reused PID is never killed; ``done`` ends a good apply.
- ``plan.json``: the plan that was applied (for ``status``; destroy never needs it).
- ``lock``: ``<pid> <starttime>`` of the applying process while apply runs.

/run is a tmpfs, so there is no fsync: the page cache survives the death of the writer, and a
reboot removes every kernel object along with the ledger.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from netlab.plan.types import Plan

DEFAULT_RUN_DIR = "/run/netlab"
LEDGER = "ledger.jsonl"
PLAN = "plan.json"
LOCK = "lock"
from netlab.names import LAB_NAME_RE as _LAB_RE  # the one lab-name rule (full match, netlab/names.py)


class LabExistsError(FileExistsError):
    pass


class LabBusyError(RuntimeError):
    pass


def run_dir() -> Path:
    return Path(os.environ.get("NETLAB_RUN_DIR", DEFAULT_RUN_DIR))


def lab_dir(lab: str) -> Path:
    if not _LAB_RE.match(lab):
        raise ValueError(f"invalid lab name {lab!r}")
    return run_dir() / lab


def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[19])


def pid_alive(pid: int, starttime: int) -> bool:
    """True if ``pid`` is still the same process (not a reused PID) and not a zombie."""
    st = proc_starttime(pid)
    if st != starttime:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in (b"Z", b"X")


def plan_json(plan: Plan) -> str:
    """Same document as ``plan.to_json()`` (``Plan.from_dict`` reads either), ~5x faster.

    ``dataclasses.asdict`` deep-copies recursively, which costs ~0.13 ms per pod, a tenth of
    the kernel's own per-pod cost; plan values are flat frozen dataclasses whose fields are
    scalars or tuples of scalars, so their ``__dict__`` is already JSON-ready (``paths`` alone
    nests values, its hops).
    """
    d: dict[str, Any] = {}
    for f in dataclasses.fields(plan):
        v = getattr(plan, f.name)
        if f.name == "paths":  # the one section with nested values (hops): few, small
            d[f.name] = [dataclasses.asdict(x) for x in v]
        else:
            d[f.name] = [x.__dict__ for x in v] if isinstance(v, tuple) else v
    return json.dumps(d, separators=(",", ":"))


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps(separators=...) builds one per call


def _line(d: dict[str, Any]) -> bytes:
    return (_ENCODER.encode(d) + "\n").encode()


# The types whose intent carries the object's fields: destroy reads a netns's name and a file's
# path. The others (devices, addresses, routes, rules, sysctls, ipsets, iptables) go with their
# netns; their key names them (plan.json has their fields). A line per object is on apply's
# critical path, 1000s per lab: a full line costs ~3 us of JSON encoding, a key line ~0.5 us.
_WITH_FIELDS = frozenset({"Netns", "File"})
_esc = json.encoder.encode_basestring_ascii


def _intent_line(o: Any) -> bytes:
    t = type(o).__name__
    if t in _WITH_FIELDS:
        return _line({"op": "intent", "key": o.key, "type": t, "obj": o.__dict__})
    return f'{{"op":"intent","key":{_esc(o.key)},"type":"{t}"}}\n'.encode()


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


_SELF_ID: tuple[int, str] | None = None


def _self_id() -> str:
    """``<pid> <starttime>`` of this process (read once: neither changes while it lives)."""
    global _SELF_ID
    pid = os.getpid()
    if _SELF_ID is None or _SELF_ID[0] != pid:  # (a fork has another pid and starttime)
        _SELF_ID = (pid, f"{pid} {proc_starttime(pid)}")
    return _SELF_ID[1]


class Ledger:
    """The writer side, held by one apply. Thread-safe: each record is one O_APPEND write."""

    def __init__(self, lab: str, fd: int) -> None:
        self.lab = lab
        self.dir = lab_dir(lab)
        self._fd = fd

    @classmethod
    def create(cls, plan: Plan) -> "Ledger":
        """Start the ledger of a new lab; LabExistsError if the lab already has one."""
        d = lab_dir(plan.lab)
        try:
            try:
                os.mkdir(d, 0o700)
            except FileNotFoundError:  # the first lab: make the run directory too
                d.parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(d, 0o700)
        except FileExistsError:
            raise LabExistsError(f"lab {plan.lab!r} already has a ledger at {d}; destroy it first") from None
        _append(d / LOCK, f"{_self_id()}\n".encode())
        fd = os.open(d / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return cls(plan.lab, fd)

    def write_plan(self, plan: Plan) -> None:
        """``plan.json``, what ``Lab.attach`` reads. destroy needs only the ledger, so apply
        writes this while its configure batches run in the kernel (its encoding holds the GIL);
        written to a temporary name and renamed, so a reader never sees half of it."""
        tmp = self.dir / (PLAN + ".tmp")
        tmp.write_text(plan_json(plan))
        tmp.rename(self.dir / PLAN)

    def intent(self, objs: list[Any]) -> None:
        """Record objects about to be created, in one write (a batch's worth)."""
        if objs:
            os.write(self._fd, b"".join(_intent_line(o) for o in objs))

    def failed(self, obj: Any) -> None:
        os.write(self._fd, _line({"op": "failed", "key": obj.key}))

    def mkdir(self, path: str) -> None:
        os.write(self._fd, _line({"op": "mkdir", "path": path}))

    def done(self) -> None:
        os.write(self._fd, _line({"op": "done"}))
        (self.dir / LOCK).unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def record_process(lab: str, name: str, pid: int) -> None:
    """Record a process the runtime started for ``lab``, so destroy can stop it (pid + starttime)."""
    st = proc_starttime(pid)
    if st is None:
        raise ProcessLookupError(f"process {name!r}: no pid {pid}")
    d = lab_dir(lab)
    if not d.is_dir():
        raise FileNotFoundError(f"lab {lab!r} has no ledger at {d}")
    _append(d / LEDGER, _line({"op": "process", "name": name, "pid": pid, "starttime": st}))


def read_entries(lab: str) -> list[dict[str, Any]]:
    """Every complete line of the ledger; a torn last line (killed mid-write) is ignored."""
    try:
        data = (lab_dir(lab) / LEDGER).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out


def read_plan(lab: str) -> Plan | None:
    try:
        return Plan.from_dict(json.loads((lab_dir(lab) / PLAN).read_text()))
    except (FileNotFoundError, ValueError):
        return None


def read_lock(lab: str) -> tuple[int, int] | None:
    try:
        pid, st = (lab_dir(lab) / LOCK).read_text().split()
        return int(pid), int(st)
    except (FileNotFoundError, ValueError):
        return None


def list_labs() -> list[str]:
    d = run_dir()
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and _LAB_RE.match(p.name))
