"""The write-ahead ledger of a lab: what may exist in the kernel because netlab made it.

Three files of the lab's state directory (:mod:`netlab.state` names them):

- the ledger: append-only JSON lines. An ``intent`` line (object key and type; and
  the object's fields for the types destroy reads them from: netns and files) is
  written with ``os.write`` on an ``O_APPEND`` fd *before* the object is created, so a SIGKILL
  between "created" and "recorded" cannot leak anything: destroy works from intents and
  tolerates objects that never came to exist. The objects destroy removes by name carry their
  identity, recorded before the name is taken, so destroy removes only what this lab provably
  made (a name it only intended may belong to someone else by then): a netns's intent carries
  its ``cookie`` (written from inside the new, still nameless namespace), a file's its
  ``dev``/``ino`` (made unnamed with O_TMPFILE, then linked in). ``mkdir`` records a directory
  apply created, with its identity; ``process`` records a runtime process with its
  ``/proc/<pid>/stat`` starttime so a reused PID is never killed; ``done`` ends a good apply.
  (``failed``, from older ledgers, marks an intent destroy must not touch.)
- the plan: the plan that was applied (for ``status`` and every command that attaches to the
  lab; destroy never needs it), written by :meth:`Ledger.write_plan`, read by :func:`read_plan`.
- the lock: ``<pid> <starttime>`` of the applying process while apply runs.

/run is a tmpfs, so there is no fsync: the page cache survives the death of the writer, and a
reboot removes every kernel object along with the ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netlab import state
from netlab.errors import LabStateError
from netlab.plan.types import Plan
from netlab.state import StateDir

if TYPE_CHECKING:
    import mmap

    Buffer = bytes | mmap.mmap  # a file's content, read or mapped


class LabExistsError(FileExistsError):
    pass


class LabBusyError(LabStateError):
    """Another live process is applying the lab."""


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
    # one top-level member per line (a JSON string never holds a raw newline, so a line that
    # starts with a quoted key is a member of the document itself): :func:`read_plan` with
    # ``parts`` parses only the lines it asks for. Still one JSON document for every other reader.
    enc = json.JSONEncoder(separators=(",", ":"))
    return "{" + ",\n".join(f"{enc.encode(k)}:{enc.encode(v)}" for k, v in d.items()) + "}"


def _plan_members(data: Buffer, parts: set[str]) -> dict[str, Any] | None:
    """The top-level members named in ``parts`` of a plan written by :func:`plan_json`, parsing
    only their lines (a node agent wants 0.3 MB of a 1,000-pod plan's 4.6 MB), and copying only
    them out of ``data`` (the file mapped); None if the text is not laid out that way (another
    writer's, an older lab's): then the caller parses it all."""
    if data[:1] != b"{" or data.find(b"\n") < 0:
        return None
    keep = []
    i, n = 1, len(data)
    while True:
        end = data.find(b"\n", i)
        last = end < 0
        if last:
            end = n
        key, colon, _ = data[i:min(end, i + 64)].partition(b":")
        # (what follows each member: the next, or the end of the document)
        if (not colon or len(key) < 2 or key[:1] != b'"' or key[-1:] != b'"'
                or data[end - 1:end] != (b"}" if last else b",")):
            return None
        if key[1:-1].decode(errors="replace") in parts:
            keep.append(data[i:end - 1])
        if last:
            break
        i = end + 1
    d = json.loads(b"{" + b",".join(keep) + b"}")
    return d if isinstance(d, dict) else None


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[Buffer]:
    """The file's bytes, mapped rather than read (a node agent looks at a few hundred KB of a
    big lab's 4-5 MB plan and ledger: reading them whole was most of its start-up's system
    time); an empty file is ``b""``. FileNotFoundError as for a read."""
    import mmap  # (here: every process that imports the ledger, the supervisor and what it forks, need not)

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            yield b""
            return
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            yield m


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps(separators=...) builds one per call


def _line(d: dict[str, Any]) -> bytes:
    return (_ENCODER.encode(d) + "\n").encode()


# The types destroy removes by name: their intent carries the object's fields (destroy reads a
# netns's name and a file's path) and its identity, and is written by Ledger.named / Ledger.file.
# The others (devices, addresses, routes, rules, sysctls, ipsets, iptables) go with their netns;
# their key names them (plan.json has their fields). A line per object is on apply's critical
# path, 1000s per lab: a full line costs ~3 us of JSON encoding, a key line ~0.5 us.
_WITH_IDENTITY = frozenset({"Netns", "File"})
_esc = json.encoder.encode_basestring_ascii


def _intent_line(o: Any) -> bytes:
    t = type(o).__name__
    if t in _WITH_IDENTITY:
        raise TypeError(f"a {t} intent carries its identity: use Ledger.named / Ledger.file")
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
        _SELF_ID = (pid, state.write_lock_text(pid, proc_starttime(pid)))
    return _SELF_ID[1]


class Ledger:
    """The writer side, held by one apply. Thread-safe: each record is one O_APPEND write."""

    def __init__(self, lab: str, fd: int) -> None:
        self.lab = lab
        self.files = StateDir.of(lab)
        self._fd = fd

    @classmethod
    def create(cls, plan: Plan) -> Ledger:
        """Start the ledger of a new lab; LabExistsError if the lab already has one."""
        sd = StateDir.of(plan.lab)
        try:
            try:
                os.mkdir(sd.path, 0o700)
            except FileNotFoundError:  # the first lab: make the run directory too
                sd.path.parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(sd.path, 0o700)
        except FileExistsError:
            raise LabExistsError(f"lab {plan.lab!r} already has a ledger at {sd.path}; destroy it first") from None
        _append(sd.lock, _self_id().encode())
        fd = os.open(sd.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return cls(plan.lab, fd)

    @classmethod
    def append_to(cls, lab: str) -> Ledger:
        """The ledger of a lab that is up, to record more (a live label change, kernel/live.py);
        the caller holds the lab's lock (:func:`take_lock`)."""
        sd = StateDir.of(lab)
        fd = os.open(sd.ledger, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        return cls(lab, fd)

    def note(self, op: str, **fields: Any) -> None:
        """A line destroy does not read (``op`` is none of its), saying what was done and why."""
        os.write(self._fd, _line({"op": op, **fields}))

    def write_plan(self, plan: Plan) -> None:
        """The plan file, what ``Lab.attach`` reads. destroy needs only the ledger, so apply
        writes this while its configure batches run in the kernel (its encoding holds the GIL);
        written to a temporary name and renamed, so a reader never sees half of it."""
        dest = self.files.plan
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(plan_json(plan))
        tmp.rename(dest)

    def intent(self, objs: list[Any]) -> None:
        """Record objects about to be created, in one write (a batch's worth)."""
        if objs:
            os.write(self._fd, b"".join(_intent_line(o) for o in objs))

    def named(self, netns: Any, cookie: int, objs: Sequence[Any] = ()) -> None:
        """Record ``netns`` with its identity, from inside the new namespace before it takes its
        name (see :func:`netlab.netns.new_netns`), and the intents of ``objs`` (the pod's
        devices, addresses...) in the same write: what a pod costs in ledger writes is unchanged."""
        line = _line({"op": "intent", "key": netns.key, "type": "Netns", "obj": netns.__dict__, "cookie": cookie})
        os.write(self._fd, line + b"".join(_intent_line(o) for o in objs))

    def file(self, f: Any, dev: int, ino: int) -> None:
        """A file's intent with the identity of the unnamed inode that is about to take its path."""
        os.write(self._fd, _line({"op": "intent", "key": f.key, "type": "File", "obj": f.__dict__,
                                  "dev": dev, "ino": ino}))

    def mkdir(self, path: str, dev: int, ino: int) -> None:
        """A directory apply made (recorded once made: a kill in between leaves an empty directory
        destroy does not claim)."""
        os.write(self._fd, _line({"op": "mkdir", "path": path, "dev": dev, "ino": ino}))

    def done(self, keep_lock: bool = False) -> None:
        os.write(self._fd, _line({"op": "done"}))
        if not keep_lock:
            release_lock(self.lab)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def record_process(lab: str, name: str, pid: int) -> None:
    """Record a process the runtime started for ``lab``, so destroy can stop it (pid + starttime)."""
    st = proc_starttime(pid)
    if st is None:
        raise ProcessLookupError(f"process {name!r}: no pid {pid}")
    sd = StateDir.of(lab)
    if not sd.path.is_dir():
        raise FileNotFoundError(f"lab {lab!r} has no ledger at {sd.path}")
    _append(sd.ledger, _line({"op": "process", "name": name, "pid": pid, "starttime": st}))


def read_entries(lab: str, containing: bytes = b"", matching: re.Pattern[bytes] | None = None) -> list[dict[str, Any]]:
    """Every complete line of the ledger (``containing``: only lines with these bytes in them;
    ``matching``: only lines this pattern finds something in); a torn last line (killed
    mid-write) is ignored."""
    try:
        data = StateDir.of(lab).ledger.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    lines: Iterator[bytes] | list[bytes] = _lines_with(data, containing) if containing else data.splitlines()
    for raw in lines:
        if matching is not None and not matching.search(raw):
            continue
        try:
            e = json.loads(raw)
        except ValueError:
            continue
        if isinstance(e, dict):
            out.append(e)
    return out


def _lines_with(data: Buffer, needle: bytes) -> Iterator[bytes]:
    """The lines of ``data`` that hold ``needle``, found by searching for it rather than by
    splitting every line: a 1,000-pod lab's ledger has ~32,000 lines, ~1,000 of them a netns's,
    and each of its node agents reads them at start. A last line without its newline (torn)
    is left out, as a torn line does not parse anyway."""
    i = 0
    while (j := data.find(needle, i)) >= 0:
        end = data.find(b"\n", j)
        if end < 0:
            return
        yield data[data.rfind(b"\n", 0, j) + 1:end]
        i = end + 1


#: the first ``"name"`` of a line: a Netns intent's ``obj.name`` (see :func:`netns_cookies`)
_FIRST_NAME = re.compile(rb'"name": ?"([^"\\]*)"')


def netns_cookies(lab: str, names: Collection[str] | None = None) -> dict[str, int]:
    """netns name -> the cookie recorded when apply made it: who asks for a lab's namespace by
    name (istio-cni's node agent, handing a pod's netns to ztunnel) checks it is the one the lab
    made, not another of that name. ``names``: only these netns (the others may be left out)."""
    out: dict[str, int] = {}
    # only the lines that can be a netns's: a 1,000-pod lab's ledger has ~32,000 lines, and
    # every node agent of the lab reads it at start (parsing all of them took 0.2-0.4 s each);
    # with ``names``, of those only the ones whose netns is asked for are parsed (a node agent
    # wants 50 of 1,000), told by their first "name": a Netns intent's is its obj.name (a line
    # with no plain "name" at all is parsed, and checked, like the others)
    want = None if names is None else {n.encode() for n in names}
    try:
        with _mapped(StateDir.of(lab).ledger) as data:
            lines = list(_lines_with(data, b"Netns"))
    except FileNotFoundError:
        return out
    for raw in lines:
        if want is not None:
            m = _FIRST_NAME.search(raw)
            if m is not None and m.group(1) not in want:
                continue
        try:
            e = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(e, dict):
            continue
        if e.get("op") == "intent" and e.get("type") == "Netns" and isinstance(e.get("cookie"), int):
            name = (e.get("obj") or {}).get("name")
            if isinstance(name, str):
                out[name] = e["cookie"]
    return out


def read_plan(lab: str, parts: tuple[str, ...] = (),
              where: Mapping[str, Callable[[dict[str, Any]], bool]] | None = None) -> Plan:
    """The plan ``lab`` was built from, or LabStateError saying why not (never another
    exception: a broken lab must not break commands about other labs). ``parts``: only these
    fields of the plan are read (the rest are empty), for a process that needs a few of a big
    lab's (the node agents: nodes and pods; the whole plan of 1,000 pods took 0.35 s each).
    ``where``: of these parts, only the entries a test keeps (a node agent: its node's pods)."""
    p = StateDir.of(lab).plan
    try:
        if parts:
            keep = set(parts) | {"lab", "topology", "source", "tunnel", "datapath"}
            with _mapped(p) as data:
                d = _plan_members(data, keep)
                if d is None:
                    d = {k: v for k, v in json.loads(bytes(data)).items() if k in keep}
        else:
            d = json.loads(p.read_bytes())
        for part, test in (where or {}).items():
            d[part] = [x for x in d.get(part) or () if test(x)]
        return Plan.from_dict(d)
    except FileNotFoundError:
        raise LabStateError(f"lab {lab!r} has no plan in {p} (being brought up, or a failed `up`? "
                            f"`netlab down {lab}` removes what it made)") from None
    except Exception as e:  # noqa: BLE001 - unreadable, garbage, or an older format: all the same here
        raise LabStateError(f"lab {lab!r}: unreadable state {p} ({type(e).__name__}: {e}); "
                            f"`netlab down {lab}` removes what it made") from None


def read_lock(lab: str) -> tuple[int, int] | None:
    return state.read_lock(StateDir.of(lab).lock)


def locked_by(lab: str) -> int | None:
    """The pid of another live process that holds ``lab``'s lock (applying it, starting its
    processes, repairing it), or None."""
    lock = read_lock(lab)
    if lock and lock[0] != os.getpid() and pid_alive(*lock):
        return lock[0]
    return None


def take_lock(lab: str) -> None:
    """Hold ``lab`` (as apply does from Ledger.create) for work that is not an apply: `up --repair`.
    LabBusyError if another live process holds it; a dead holder's lock is replaced."""
    busy = locked_by(lab)
    if busy:
        raise LabBusyError(f"lab {lab!r} is being brought up or repaired by pid {busy}")
    lock = StateDir.of(lab).lock
    tmp = lock.with_name(f".{lock.name}.{os.getpid()}")
    tmp.write_text(_self_id())
    tmp.rename(lock)


def release_lock(lab: str) -> None:
    """End this process's hold on ``lab`` (see Ledger.create); another process's lock stays."""
    lock = read_lock(lab)
    if lock and state.write_lock_text(*lock) == _self_id():
        StateDir.of(lab).lock.unlink(missing_ok=True)


def list_labs() -> list[str]:
    """Every lab that has a state directory (up, being brought up or down, or left broken)."""
    return state.lab_names()
