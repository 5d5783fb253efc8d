"""Starting one supervised program inside its network namespace.

Two ways in, chosen per process with ``exec_mode``:

* ``setns`` (default): the forked child calls ``setns(2)`` in ``preexec_fn`` and then execs
  Python directly. The supervisor is single-threaded, so running Python code between fork and
  exec is safe. Measured on the 2-core dev VM (15 runs each, medians): exec of /bin/true
  2.3 ms via setns vs 2.0 ms via ``ip netns exec`` (a Python ``preexec_fn`` forces fork instead
  of vfork, which eats the saved exec); httpbin spawn-to-ready 77.8 vs 78.6 ms (interpreter
  start dominates). Speed is a wash; setns is preferred because it works with ``uid``/``gid``
  drops and needs no mount namespace unless ``netns_etc`` asks for one (+9 ms).
* ``ip-netns-exec``: exec ``ip netns exec <netns> python -m ...``, for comparison and as a
  fallback. Root only (``ip netns exec`` needs CAP_SYS_ADMIN).

``netns_etc=True`` reproduces what ``ip netns exec`` does for name resolution: a private mount
namespace in which every file under ``/etc/netns/<netns>/`` is bind-mounted over the same name
in ``/etc`` (so ``/etc/netns/<netns>/hosts`` becomes that process's ``/etc/hosts``), and
``/sys`` is remounted to describe the namespace.

``run="exec"`` (a pod's own ``command``) execs ``argv`` as it is, with a small fixed environment
(PATH, HOME, LANG, POD_NAME, POD_NAMESPACE: the root caller's variables are not handed to a
program a topology file named) and ``no_new_privs`` set, so a setuid binary cannot take back what
the drop to the pod's user gave away.

Dropping to ``uid``/``gid`` (sidecars run as 1337:1337) happens after ``setns``, which needs
root, and leaves the process no capability at all (effective, permitted, inheritable, ambient and
bounding sets empty) unless the spec's ``caps`` asks for some. Such a process gets a private
mount namespace and a view of the file system (:mod:`netlab.runtime.mountview`): the
interpreter is reachable even where it lives under a 0700 directory (pyenv under ``/root``),
and the spec's ``hide``/``expose`` decide what else it sees (a sidecar: its own key, not its
neighbours'). Its real gid is 65534 while its effective, saved and file-system gids are ``gid``
(what ``--gid-owner`` matches): a program started with real and effective gids that differ is
not dumpable from its first instruction (fs/exec.c), and no other process of the same uid
may ptrace it or open ``/proc/<pid>/root`` (kernel/ptrace.c compares all three gids). Sidecars
all run as 1337 in one PID namespace, so this is what keeps one out of another's memory and
mount namespace. (Not with ``caps``: ambient capabilities do not survive such an exec.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from netlab import child_setup
from netlab import netns as ns
from netlab.runtime import mountview

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_SLAVE, MS_RDONLY = 4096, 16384, 1 << 19, 1
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 1, 8, 24, 47, 2
PR_SET_NO_NEW_PRIVS = 38
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Real gid of a process dropped to a uid without capabilities (see the module doc): nogroup.
DROPPED_REAL_GID = 65534
LINUX_CAPABILITY_VERSION_3 = 0x20080522

CAPS = {"CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12,
        "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@dataclass(frozen=True)
class ProcSpec:
    """A ``netlab.plan.types.Process`` plus how to run it. Extra keys are optional in spec JSON."""

    name: str
    netns: str  # "" = stay in the supervisor's namespace (used by unprivileged tests)
    kind: str
    argv: tuple[str, ...]
    uid: int = 0
    gid: int = 0
    ref: str = ""
    exec_mode: Literal["setns", "ip-netns-exec"] = "setns"
    netns_etc: bool = False
    env: tuple[tuple[str, str], ...] = ()
    caps: tuple[str, ...] = ()  # ambient capabilities to keep after dropping to uid
    ready_timeout: float = 30.0
    run: Literal["module", "exec"] = "module"  # python -m argv[0] ... | argv as it is (own program)
    ready_port: int = 0  # run="exec": probe this port (ready_path: HTTP GET) from ready_hosts
    ready_path: str = ""
    ready_hosts: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()  # directories this process sees empty (netlab.runtime.mountview)
    expose: tuple[str, ...] = ()  # paths under ``hide`` it sees after all, read-only
    expose_rw: tuple[str, ...] = ()  # ... and writable

    @classmethod
    def from_any(cls, p: Any) -> ProcSpec:
        """Accept a ProcSpec, a plan ``Process`` (any dataclass) or a dict from JSON."""
        if isinstance(p, ProcSpec):
            return p
        d = asdict(p) if hasattr(p, "__dataclass_fields__") else dict(p)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"process {d.get('name')!r}: unknown keys {sorted(unknown)}")
        d["argv"] = tuple(d.get("argv") or ())
        env = d.get("env") or ()
        d["env"] = tuple(sorted(env.items())) if isinstance(env, Mapping) else tuple(tuple(e) for e in env)
        for k in ("caps", "hide", "expose", "expose_rw", "ready_hosts"):
            d[k] = tuple(d.get(k) or ())
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in ("supervisor", ".", ".."):
            raise ValueError(f"bad process name {self.name!r}")
        if not self.argv:
            raise ValueError(f"process {self.name!r}: empty argv")
        if self.run not in ("module", "exec"):
            raise ValueError(f"process {self.name!r}: run must be 'module' or 'exec'")
        if self.run == "exec" and self.exec_mode != "setns":
            raise ValueError(f"process {self.name!r}: run='exec' needs exec_mode 'setns'")
        if not 0 <= self.ready_port <= 65535 or (self.ready_port and not self.ready_hosts):
            raise ValueError(f"process {self.name!r}: ready_port needs 1..65535 and ready_hosts")
        if self.exec_mode not in ("setns", "ip-netns-exec"):
            raise ValueError(f"process {self.name!r}: exec_mode must be 'setns' or 'ip-netns-exec'")
        if self.exec_mode == "ip-netns-exec" and (self.uid or self.gid or not self.netns):
            raise ValueError(f"process {self.name!r}: ip-netns-exec needs a netns and runs as root; use setns")
        if self.netns_etc and not self.netns:
            raise ValueError(f"process {self.name!r}: netns_etc needs a netns")
        for c in self.caps:
            if c not in CAPS:
                raise ValueError(f"process {self.name!r}: unknown capability {c!r} (known: {sorted(CAPS)})")
        for v in self.hide + self.expose + self.expose_rw:
            if not os.path.isabs(v):
                raise ValueError(f"process {self.name!r}: hide/expose path {v!r} is not absolute")

    @property
    def private_view(self) -> bool:
        """A mount namespace of its own: asked for, or needed to drop to another uid."""
        return self.exec_mode == "setns" and bool(self.uid or self.gid or self.hide)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["env"] = dict(self.env)
        return d

    def command(self) -> list[str]:
        if self.run == "exec":
            return list(self.argv)
        cmd = [sys.executable, "-m", *self.argv]
        if self.exec_mode == "ip-netns-exec":
            return ["ip", "netns", "exec", self.netns, *cmd]
        return cmd


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _private_mount_ns() -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Don't let our mounts propagate back to the host's mount namespace.
    _check(_libc.mount(b"none", b"/", None, MS_SLAVE | MS_REC, None), "mount --make-rslave /")


def _mount_netns_etc(netns: str) -> None:
    """What ``ip netns exec`` does after setns (iproute2 lib/namespace.c netns_switch)."""
    flags = 0
    if _libc.umount2(b"/sys", MNT_DETACH) != 0:
        flags = MS_RDONLY
    _libc.mount(netns.encode(), b"/sys", b"sysfs", flags, None)  # best effort, as ip does
    etc_dir = Path("/etc/netns") / netns
    if etc_dir.is_dir():
        for entry in sorted(etc_dir.iterdir()):
            target = Path("/etc") / entry.name
            _check(_libc.mount(str(entry).encode(), str(target).encode(), b"none", MS_BIND, None),
                   f"bind {entry} -> {target}")


def _cap_last() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


_CAP_LAST = _cap_last()


def _drop_privileges(uid: int, gid: int, caps: tuple[str, ...]) -> None:
    mask = 0
    for c in caps:
        mask |= 1 << CAPS[c]
    for cap in range(_CAP_LAST + 1):  # the bounding set: nothing the process could ever regain
        if not mask & (1 << cap):
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    if mask:
        _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    # not with caps: an exec with real gid != effective gid clears the ambient set
    os.setresgid(gid if mask or not uid else DROPPED_REAL_GID, gid, gid)
    os.setresuid(uid, uid, uid)
    hdr = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")
    for c in caps:
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAPS[c], 0, 0), f"ambient raise {c}")


def plan_view(spec: ProcSpec) -> list[mountview.Op]:
    """The mounts of ``spec``'s private view (run in the supervisor, before fork): its own
    ``hide``/``expose``, and the interpreter made reachable for its uid."""
    if not spec.private_view:
        return []
    reach = mountview.interpreter_paths() if spec.uid else []
    return mountview.plan_view(spec.uid, spec.gid, hide=spec.hide, expose=spec.expose, expose_rw=spec.expose_rw,
                               reach=reach)


def make_preexec(spec: ProcSpec, caps: tuple[str, ...], parent_pid: int,
                 view: list[mountview.Op] | None = None) -> Any:
    """The function run in the child between fork and exec (stdout/stderr already on the log)."""

    def preexec() -> None:
        try:
            if spec.netns and spec.exec_mode == "setns":
                ns.setns(spec.netns)
            if spec.netns_etc or spec.private_view:
                _private_mount_ns()
            if spec.netns_etc:
                _mount_netns_etc(spec.netns)
            if view:
                mountview.apply_view(view)
            child_setup.raise_nofile()  # as root: the hard limit too, whatever `up` was run under
            if spec.uid or spec.gid:
                _drop_privileges(spec.uid, spec.gid, caps)
            if spec.run == "exec":
                _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
            # Last, because credential changes reset it: if the supervisor dies (even by
            # SIGKILL) its children get SIGTERM instead of running on unsupervised. (Cleared
            # again at exec for a real gid != effective gid: child_setup sets it once more.)
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
            if os.getppid() != parent_pid:
                os._exit(70)
        except BaseException as e:
            os.write(2, f"netlab supervisor: cannot start {spec.name!r} in netns {spec.netns!r}: {e}\n".encode())
            raise

    return preexec


def child_env(spec: ProcSpec, lab: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    import netlab

    if spec.run == "exec":  # a pod's own program: nothing of the caller's environment
        pod_ns, _, pod = spec.ref.partition("/")
        env = {"PATH": EXEC_PATH, "HOME": "/", "LANG": "C.UTF-8", "POD_NAME": pod, "POD_NAMESPACE": pod_ns,
               "NETLAB_LAB": lab, "NETLAB_PROC": spec.name, "NETLAB_NETNS": spec.netns}
        env.update(dict(spec.env))
        return env
    env = dict(os.environ if base is None else base)
    root = str(Path(list(netlab.__path__)[0]).parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(PYTHONUNBUFFERED="1", NETLAB_LAB=lab, NETLAB_PROC=spec.name, NETLAB_NETNS=spec.netns)
    env[child_setup.SUPERVISOR_PID_ENV] = str(os.getpid())
    env.update(dict(spec.env))
    return env


def spawn(spec: ProcSpec, lab: str, log_fd: int, caps: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """Fork/exec one process with stdout+stderr on ``log_fd``; nothing else is inherited.

    ``start_new_session`` makes the child a process-group leader so the supervisor can signal
    the whole group (the app and anything it forked) with one killpg.
    """
    view = plan_view(spec)  # ValueError: the view cannot be made (the supervisor logs it)
    return subprocess.Popen(
        spec.command(), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, close_fds=True,
        cwd="/", env=child_env(spec, lab), start_new_session=True,
        preexec_fn=make_preexec(spec, caps, os.getpid(), view),
    )
