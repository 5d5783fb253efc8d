"""A lab's state directory: where each file of it lives, what it is called, and the records read
back from it as data. No other module spells these names.

Every package talks through this directory (apply writes the ledger and the plan, the runtime its
records and logs, ``up`` the mesh's registry and CA, the proxies their connection legs, and
``status``, ``down``, ``trace`` and ``logs`` read them back), so one module owns its layout:

``$NETLAB_RUN_DIR/<lab>/`` (default ``/run/netlab/<lab>/``; made 0700 by apply), by writer:

* kernel/ledger: ``ledger.jsonl`` (the write-ahead ledger of what may exist in the kernel),
  ``plan.json`` (the plan that was applied, a ``netlab.plan.types.Plan``), ``lock`` (``<pid>
  <starttime>`` of the process applying or repairing the lab);
* runtime/supervisor: ``spec.json`` (the processes it runs), ``supervisor.json`` (``{pid,
  starttime, lab, state}`` of the daemon), ``supervisor.lock`` (its flock), ``supervisor.log``
  (its own log), ``procs.json`` (process name -> record), ``logs/<name>.log`` (a process's
  output, appended across restarts), ``requests/<name>`` (a restart request);
* mesh/bootstrap, istiod's part of ``up``: ``registry.json`` (the workload registry), ``ca/``
  (the lab CA and a leaf per identity; its inside is :mod:`netlab.mesh.ca`'s), ``conn/`` (root's;
  ``<component>.jsonl`` and ``.jsonl.1``, a proxy's connection legs, written by the proxy);
* mesh/nodeagent, istio-cni's node agent of each node (datapath inpod): ``zds/`` (root's, 0700)
  with ``<node>.sock``, the ZDS socket that node's ztunnel connects to (``/var/run/ztunnel/
  ztunnel.sock`` in a cluster), and ``<node>.ctl``, the agent's request socket (enrol or unenrol
  one pod at run time).

Read back as data here: the lock (:func:`read_lock`), the supervisor's JSON records
(:func:`read_record`, written atomically by :func:`write_record`) and a proxy's connection leg
(:class:`ConnLeg`, the record a proxy writes too).
``plan.json`` is a ``Plan`` (its type is the plan layer's, above this one): it is read by
:func:`netlab.kernel.ledger.read_plan`. The lab name, which is a directory name here, is checked
with the one rule of :mod:`netlab.names`.

A shared utility at the bottom of the package: it imports nothing from netlab but ``names``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from time import time as _now
from typing import Any

from netlab.names import LAB_NAME_RE, check_lab_name

DEFAULT_RUN_DIR = "/run/netlab"
RUN_DIR_ENV = "NETLAB_RUN_DIR"

LEDGER = "ledger.jsonl"
PLAN = "plan.json"
LOCK = "lock"
SPEC = "spec.json"
SUPERVISOR = "supervisor.json"
SUPERVISOR_LOCK = "supervisor.lock"
SUPERVISOR_LOG = "supervisor.log"
PROCS = "procs.json"
LOGS = "logs"
LOG_SUFFIX = ".log"
REQUESTS = "requests"
REGISTRY = "registry.json"
LABELS = "labels.json"
WAYPOINTS = "waypoints.json"  # the waypoints `netlab waypoint` added or removed since `up` (netlab.mesh.livewaypoint)
PROBES = "probes"  # probes/<node>.json: what the kubelet stand-in of <node> last saw (netlab.mesh.kubelet)  # the label changes `netlab label` made since `up` (netlab.mesh.relabel)
CA = "ca"
CA_CERTS = "certs"  # ca/certs/<identity>/: the leaves (netlab.mesh.ca issues them)
CONN = "conn"
CONN_SUFFIX = ".jsonl"
#: A component's second connection-log file (see :mod:`netlab.mesh.connlog`: the writer alternates).
CONN_ROTATED_SUFFIX = ".1"
ZDS = "zds"
ZDS_SUFFIX = ".sock"
ZDS_CONTROL_SUFFIX = ".ctl"
#: sun_path of a unix socket holds 107 bytes and a NUL
UNIX_PATH_MAX = 107
#: The files that say a supervisor was started for the lab (``down`` stops it first).
SUPERVISOR_FILES = (SUPERVISOR, PROCS, SPEC)


def run_dir() -> Path:
    """Where every lab's state directory is: ``$NETLAB_RUN_DIR``, default ``/run/netlab``."""
    return Path(os.environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR))


def lab_dir(lab: str) -> Path:
    """The state directory of ``lab``; :class:`netlab.names.BadName` (a ValueError) for a name
    that is no lab name (it becomes one path component under the run directory)."""
    return run_dir() / check_lab_name(lab)


def lab_names() -> list[str]:
    """Every directory in the run directory that is named like a lab, sorted."""
    d = run_dir()
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and LAB_NAME_RE.match(p.name))


@dataclass(frozen=True)
class StateDir:
    """The paths of one lab's state directory (see the module docstring for who writes what)."""

    path: Path

    @classmethod
    def of(cls, lab: str) -> StateDir:
        return cls(lab_dir(lab))

    @property
    def ledger(self) -> Path:
        return self.path / LEDGER

    @property
    def plan(self) -> Path:
        return self.path / PLAN

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def spec(self) -> Path:
        return self.path / SPEC

    @property
    def supervisor(self) -> Path:
        return self.path / SUPERVISOR

    @property
    def supervisor_lock(self) -> Path:
        return self.path / SUPERVISOR_LOCK

    @property
    def supervisor_log(self) -> Path:
        return self.path / SUPERVISOR_LOG

    @property
    def procs(self) -> Path:
        return self.path / PROCS

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def requests(self) -> Path:
        return self.path / REQUESTS

    @property
    def registry(self) -> Path:
        return self.path / REGISTRY

    @property
    def labels(self) -> Path:
        return self.path / LABELS

    @property
    def waypoints(self) -> Path:
        return self.path / WAYPOINTS

    @property
    def probes(self) -> Path:
        return self.path / PROBES

    def probe_status(self, node: str) -> Path:
        """``probes/<node>.json``: each probe of the node's kubelet stand-in and its last result."""
        return self.path / PROBES / f"{node}.json"

    @property
    def ca(self) -> Path:
        return self.path / CA

    @property
    def conn(self) -> Path:
        return self.path / CONN

    @property
    def zds(self) -> Path:
        return self.path / ZDS

    def zds_socket(self, node: str) -> Path:
        """``zds/<node>.sock``: where node ``node``'s istio-cni agent listens for its ztunnel."""
        return _unix_path(self.zds / f"{node}{ZDS_SUFFIX}")

    def zds_control(self, node: str) -> Path:
        """``zds/<node>.ctl``: the agent's request socket (``{"op": "add"|"del", "pod": "ns/name"}``)."""
        return _unix_path(self.zds / f"{node}{ZDS_CONTROL_SUFFIX}")

    def log(self, name: str) -> Path:
        """``logs/<name>.log``: the output of the supervised process ``name``."""
        return self.logs / f"{name}{LOG_SUFFIX}"

    def log_names(self) -> list[str]:
        """The processes that have a log, sorted."""
        if not self.logs.is_dir():
            return []
        return sorted(p.name[: -len(LOG_SUFFIX)] for p in self.logs.glob(f"*{LOG_SUFFIX}"))

    def request(self, name: str) -> Path:
        """``requests/<name>``: a restart request for the supervised process ``name``."""
        return self.requests / name

    def conn_log(self, component: str) -> Path:
        """``conn/<component>.jsonl``: a proxy's connection log (its second file adds ``.1``)."""
        return self.conn / f"{component}{CONN_SUFFIX}"

    def conn_logs(self) -> dict[str, Path]:
        """component -> its connection log, for every component that has one."""
        if not self.conn.is_dir():
            return {}
        return {f.name[: -len(CONN_SUFFIX)]: f for f in sorted(self.conn.glob(f"*{CONN_SUFFIX}"))}

    def has_supervisor_files(self) -> bool:
        """Whether a supervisor was ever started here (its records, or the spec it was given)."""
        return any((self.path / f).exists() for f in SUPERVISOR_FILES)


def _unix_path(p: Path) -> Path:
    if len(os.fsencode(p)) > UNIX_PATH_MAX:
        raise ValueError(f"{p}: too long for a unix socket ({UNIX_PATH_MAX} bytes at most; "
                         f"a shorter ${RUN_DIR_ENV} or lab name)")
    return p


def write_record(path: Path, obj: Any) -> None:
    """A JSON record (the supervisor's, its processes', its spec), replaced atomically: written to
    a temporary name beside it and renamed, so a reader never sees half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(path: Path) -> Any:
    """A JSON record written by :func:`write_record`, or None if there is none."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_lock_text(pid: int, starttime: int | None) -> str:
    """The ``lock`` file's content: the holder's pid and start time (a pid alone can be reused)."""
    return f"{pid} {starttime}\n"


def read_lock(path: Path) -> tuple[int, int] | None:
    """(pid, starttime) from a ``lock`` file, or None (no file, or not a lock)."""
    try:
        pid, st = path.read_text().split()
        return int(pid), int(st)
    except (OSError, ValueError):
        return None


@dataclass
class ConnLeg:
    """One line of a proxy's connection log: what the proxy did with one accepted connection.

    The proxy fills one in while it relays (``finish`` when the connection ends) and
    :class:`netlab.mesh.connlog.ConnLog` appends it as a JSON line; ``netlab trace`` and ``netlab
    logs --conn`` read it back (``from_dict``, after the readers in ``netlab.mesh.connlog`` have
    checked each field's type). The downstream 4-tuple of one leg equals the upstream 4-tuple of
    the previous proxy's leg: that is how a trace joins them.
    """

    component: str  # e.g. ztunnel-node-a, httpbin.bar-sidecar, waypoint.bar-2
    listener: str  # outbound:15001 | inbound:15006 | hbone:15008 | ...
    src: str  # downstream peer "ip:port"
    orig_dst: str  # "ip:port" the client meant (VIP or pod), or the CONNECT authority
    local: str = ""  # downstream local "ip:port" as accepted
    up_src: str = ""  # upstream "ip:port" the proxy connected from
    up_dst: str = ""  # upstream "ip:port" it connected to
    proto: str = "tcp"  # upstream protocol: tcp | hbone
    authority: str = ""  # HBONE :authority sent or received
    src_id: str = ""  # SPIFFE identity of the source workload
    dst_id: str = ""  # SPIFFE identity of the destination (or waypoint)
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    outcome: str = "ok"  # ok | reset | refused | 400 | 401 | 404 | 503 | error:<text>
    start: float = field(default_factory=_now)  # when the connection was accepted
    duration_ms: float = 0.0
    time: str = ""  # ``start`` as ISO 8601 UTC, for people (the writer fills it in)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. why a policy denied it

    def finish(self, outcome: str | None = None) -> ConnLeg:
        """The connection ended (``outcome``, when it says more than ``ok``): its duration."""
        if outcome is not None:
            self.outcome = outcome
        self.duration_ms = round((_now() - self.start) * 1000, 3)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnLeg:
        """A leg from a parsed log line (one that ``netlab.mesh.connlog`` accepted as a leg)."""
        return cls(**{k: d[k] for k in _CONN_LEG_FIELDS if k in d})

    def to_dict(self) -> dict[str, Any]:
        """The line as the proxy wrote it (``extra`` only when it says something)."""
        d = dataclasses.asdict(self)
        if not d["extra"]:
            del d["extra"]
        return d


_CONN_LEG_FIELDS = tuple(f.name for f in dataclasses.fields(ConnLeg))

__all__ = ["CA", "CA_CERTS", "CONN", "CONN_ROTATED_SUFFIX", "CONN_SUFFIX", "DEFAULT_RUN_DIR", "LEDGER", "LOCK", "LOGS",
           "LABELS", "LOG_SUFFIX", "PROBES", "PLAN", "PROCS", "REGISTRY", "REQUESTS", "RUN_DIR_ENV", "SPEC", "SUPERVISOR",
           "SUPERVISOR_FILES", "SUPERVISOR_LOCK", "SUPERVISOR_LOG", "WAYPOINTS", "ZDS", "ZDS_CONTROL_SUFFIX", "ZDS_SUFFIX", "ConnLeg", "StateDir", "lab_dir",
           "lab_names", "read_lock", "read_record", "run_dir", "write_lock_text", "write_record"]
