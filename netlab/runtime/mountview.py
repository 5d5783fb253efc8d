"""A process's own view of the file system, so a program dropped to another uid needs no capability.

A sidecar runs as uid 1337 (§6) and needs to read three things: the Python interpreter and
netlab, its lab's registry and CA certificate, and its own certificate and key. On a machine
where Python lives under a 0700 directory (pyenv under ``/root``), uid 1337 cannot even start
it; and a uid-1337 process that can read the lab's state directory can read the key of every
sidecar of every lab (they all run as 1337). A Kubernetes pod has neither problem: it sees its
own image and its own secret volume. This module gives a process that view, in a private mount
namespace made by ``spawn`` between fork and exec, without changing anything on the host:

* ``hide``: directories covered by an empty tmpfs (root-owned, 0755) in this process's view;
* ``expose`` / ``expose_rw``: paths under a hidden directory bound back in, read-only or
  writable, at the same place (nothing else under the hidden directory is visible);
* ``reach``: paths the process must be able to open (the interpreter). Where an ancestor is a
  directory the uid cannot enter, that directory is hidden and its entry on the way to the path
  is bound back in (``/root`` -> tmpfs, ``/root/.pyenv`` bound in): the rest of ``/root`` stays
  invisible, and the bound tree keeps its own permissions.

:func:`plan_view` is pure (it only stats the host's files) and runs in the supervisor;
:func:`apply_view` runs in the child, as root, in its new mount namespace.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import stat
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
TMPFS_OPTIONS = b"mode=0755,size=1m,nr_inodes=4096"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


@dataclass(frozen=True)
class Op:
    """One mount of a view: an empty tmpfs over ``path``, or ``path`` bound onto itself."""

    path: str
    kind: Literal["tmpfs", "bind"]
    writable: bool = False

    @property
    def depth(self) -> int:
        return len(PurePosixPath(self.path).parts)


def _norm(p: str) -> str:
    if not os.path.isabs(p):
        raise ValueError(f"view path {p!r} is not absolute")
    return os.path.realpath(p)


def _ancestors(p: str) -> list[str]:
    """``/a/b/c`` -> ``["/", "/a", "/a/b"]``."""
    parts = PurePosixPath(p).parts
    return [str(PurePosixPath(*parts[:i])) for i in range(1, len(parts))]


def _under(p: str, d: str) -> bool:
    return p == d or p.startswith(d.rstrip("/") + "/")


def allowed(path: str, uid: int, gid: int, bits: int) -> bool:
    """Would ``uid:gid`` (no supplementary groups, no capabilities) get ``bits`` (R_OK/W_OK/X_OK)
    on ``path`` by its mode? Root always would."""
    if uid == 0:
        return True
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if st.st_uid == uid:
        have = (st.st_mode >> 6) & 7
    elif st.st_gid == gid:
        have = (st.st_mode >> 3) & 7
    else:
        have = st.st_mode & 7
    return have & bits == bits


def plan_view(uid: int, gid: int, *, hide: Iterable[str] = (), expose: Iterable[str] = (),
              expose_rw: Iterable[str] = (), reach: Iterable[str] = ()) -> list[Op]:
    """The mounts (parents first) that give ``uid:gid`` the view described in the module doc.

    Raises ValueError when an exposed path is not under a hidden directory, or when a path
    cannot be made usable for ``uid`` by mounts alone (its own mode forbids it).
    """
    hides = {_norm(h) for h in hide}
    binds: dict[str, bool] = {}  # path -> writable
    for p, rw in [(p, False) for p in expose] + [(p, True) for p in expose_rw]:
        q = _norm(p)
        if not any(_under(q, h) and q != h for h in hides):
            raise ValueError(f"exposed path {q} is not under a hidden directory ({sorted(hides)})")
        binds[q] = rw
    wanted = list(binds.items())
    reach = [_norm(r) for r in reach if os.path.exists(r)]

    def layer(d: str) -> str:
        """What ``d`` is in the view: real, the root of a hiding tmpfs, or inside one."""
        best, kind = "", "real"
        for h in hides:
            if _under(d, h) and len(h) > len(best):
                best, kind = h, ("tmpfs" if d == h else "synth")
        for b in binds:
            if _under(d, b) and len(b) >= len(best):
                best, kind = b, "real"
        return kind

    for _ in range(64):  # each round adds a mount; a path has few components
        changed = False
        for p, _rw in wanted:  # explicit binds: their ancestors must be enterable
            for a in _ancestors(p):
                if layer(a) == "real" and not allowed(a, uid, gid, os.X_OK):
                    hides.add(a)
                    changed = True
                    break
        for r in reach:  # the interpreter: bind in the entry of each blocking directory
            chain = _ancestors(r) + [r]
            for a, nxt in itertools.pairwise(chain):
                kind = layer(a)
                if kind == "real" and not allowed(a, uid, gid, os.X_OK):
                    hides.add(a)
                    binds[nxt] = False
                    changed = True
                    break
                if kind in ("tmpfs", "synth") and layer(nxt) == "synth":
                    binds[nxt] = False
                    changed = True
                    break
        if not changed:
            break
    for p, rw in wanted:
        need = os.R_OK | (os.W_OK if rw else 0) | (os.X_OK if os.path.isdir(p) else 0)
        if not allowed(p, uid, gid, need):
            raise ValueError(f"uid {uid} gid {gid} may not {'write' if rw else 'read'} {p} (mode, owner)")
    for r in reach:
        need = os.R_OK | (os.X_OK if os.path.isdir(r) else 0)
        if not allowed(r, uid, gid, need):
            raise ValueError(f"uid {uid} gid {gid} cannot read {r}, and no mount can change that")
    ops = [Op(h, "tmpfs") for h in hides] + [Op(b, "bind", rw) for b, rw in binds.items()]
    return sorted(ops, key=lambda o: (o.depth, o.kind != "tmpfs", o.path))


def interpreter_paths() -> list[str]:
    """What a child needs to start ``python -m netlab...``: this interpreter, its stdlib and
    site-packages, and the directory netlab is imported from (PYTHONPATH, see ``spawn``)."""
    import netlab

    names = ("stdlib", "platstdlib", "purelib", "platlib")
    paths = {sys.executable, os.path.realpath(sys.executable), os.path.dirname(os.__file__),
             os.path.dirname(list(netlab.__path__)[0])}
    paths |= {v for k, v in sysconfig.get_paths().items() if k in names}
    paths |= {p for p in sys.path if os.path.isabs(p) and os.path.isdir(p)}
    libdir = sysconfig.get_config_var("LIBDIR")
    if isinstance(libdir, str):
        paths.add(libdir)
    return sorted(p for p in paths if os.path.exists(p))


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def apply_view(ops: list[Op]) -> None:
    """Mount ``ops`` in this process's (private) mount namespace. Root only; run after fork."""
    fds = {}
    try:
        for op in ops:  # resolve every source in the host's view, before anything is covered
            if op.kind == "bind":
                fds[op.path] = os.open(op.path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
        for op in ops:
            target = op.path.encode()
            if op.kind == "tmpfs":
                os.makedirs(op.path, exist_ok=True)  # exists, unless inside another hidden dir
                _check(_libc.mount(b"tmpfs", target, b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, TMPFS_OPTIONS),
                       f"tmpfs on {op.path}")
                continue
            fd = fds[op.path]
            if not os.path.lexists(op.path):  # a mount point inside a hiding tmpfs
                os.makedirs(os.path.dirname(op.path), exist_ok=True)
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.mkdir(op.path)
                else:
                    os.close(os.open(op.path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), target, None, MS_BIND | MS_REC, None),
                   f"bind {op.path}")
            flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if op.writable else MS_RDONLY)
            _check(_libc.mount(None, target, None, flags, None), f"remount {op.path}")
    finally:
        for fd in fds.values():
            os.close(fd)
