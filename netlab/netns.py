"""Thread-scoped network-namespace switching.

Python 3.11 has no ``os.setns``/``os.unshare``, and forking a helper per namespace costs ~0.2 s
(fork + setns + imports). ``setns(2)`` and ``unshare(CLONE_NEWNET)`` act on the *calling thread*
only, so a worker thread can hop into a lab namespace, open its sockets there (a socket stays
bound to the namespace it was created in) and hop back, for a few microseconds.

Every writer asserts the namespace of its socket with ``SO_NETNS_COOKIE`` before writing, so a
socket opened in the wrong place (the root namespace!) is caught instead of configuring the host.

A shared utility at the bottom of the package (the kernel layer, the Geneve relay, the runtime,
verify and doctor all enter namespaces): it imports nothing from netlab but ``testhooks``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from netlab import testhooks

NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns` keeps its bind mounts
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
SO_NETNS_COOKIE = 71  # Linux >= 5.14
# nsfs ioctls (linux/nsfs.h): the namespace's type (Linux >= 4.11); its 64-bit id, which for a
# network namespace is its cookie (Linux >= 6.18; older kernels: a socket made inside it)
NS_GET_NSTYPE = 0xB703
NS_GET_ID = 0x8008B70D
NOT_A_NETNS = 0  # netns_id() of a name that holds a file but no namespace (no cookie is 0)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class NetnsError(OSError):
    """A namespace operation failed; the message names the namespace."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"{what}: {os.strerror(err)}")


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def setns_fd(fd: int) -> None:
    """Move the calling thread into the network namespace behind ``fd``."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def setns(name: str) -> None:
    """Move the calling thread into the named namespace (``/run/netns/<name>``)."""
    try:
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"network namespace {name!r} does not exist") from None
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns into {name!r}")
    finally:
        os.close(fd)


def own_netns_fd() -> int:
    """An fd for the calling thread's current network namespace (caller closes it)."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside ``name``, then return it where it was."""
    home = own_netns_fd()
    try:
        setns(name)
        try:
            yield
        finally:
            setns_fd(home)
    finally:
        os.close(home)


def socket_cookie(sock: socket.socket | int) -> int:
    """The netns cookie of the namespace a socket lives in."""
    s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=os.dup(sock))
    try:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    finally:
        if s is not sock:
            s.close()


def current_cookie() -> int:
    """Cookie of the calling thread's namespace (via a throwaway socket made here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return socket_cookie(s)


def netns_cookie(name: str) -> int:
    with in_netns(name):
        return current_cookie()


def netns_id(name: str) -> int | None:
    """The cookie of the namespace mounted at ``/run/netns/<name>``: the identity `down` compares
    with the one the ledger recorded. Cookies are 64-bit and never reused (an inode number is, as
    soon as its namespace is freed). None if there is nothing at that name (or the name cannot
    exist: too long, a ``/`` in it); :data:`NOT_A_NETNS` if a file is there but no namespace (the
    placeholder of a creation that was killed before its bind mount)."""
    try:
        fd = open_netns(name)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink: `ip netns` never makes one, nor do we
            return NOT_A_NETNS
        raise
    if fd is None:
        return None
    try:
        return fd_cookie(fd)
    finally:
        os.close(fd)


def open_netns(name: str) -> int | None:
    """``/run/netns/<name>`` opened (O_NOFOLLOW: a symlink raises ELOOP); the caller closes the
    fd. None if nothing is there, or the name cannot exist."""
    try:
        return os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EINVAL):
            return None
        raise


def unmount_netns_fd(fd: int, name: str) -> None:
    """Unmount the mount an fd of :func:`open_netns` is on, through ``/proc/self/fd/<fd>``: the
    namespace the caller read the cookie of from that fd, never one mounted at ``name`` since.
    Lazily, as ``ip netns delete`` (the namespace lives while something holds it, the fd too);
    one not mounted any more is no error. The file the mount was on stays: the caller unlinks it."""
    ret = _libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH)
    err = ctypes.get_errno() if ret else 0
    if err == errno.ENOENT:  # no /proc: by its name
        ret = _libc.umount2(str(netns_path(name)).encode(), MNT_DETACH)
        err = ctypes.get_errno() if ret else 0
    if err and err not in (errno.EINVAL, errno.ENOENT):
        raise NetnsError(err, f"umount netns {name!r}: {os.strerror(err)}")


def fd_cookie(fd: int) -> int:
    """The cookie of the network namespace an open ``fd`` (of ``/run/netns/<name>``,
    ``/proc/<pid>/ns/net``) refers to, or :data:`NOT_A_NETNS` if it is no netns: what tells a
    namespace handed over by fd (istio-cni's ZDS) from another one of the same name."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, NS_GET_ID, buf)
        return int.from_bytes(buf, "little")
    except OSError:
        pass
    try:
        if fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
            return NOT_A_NETNS
    except OSError:  # not an nsfs file
        return NOT_A_NETNS
    home = own_netns_fd()  # a kernel without NS_GET_ID: ask a socket made inside it
    try:
        setns_fd(fd)
        try:
            return current_cookie()
        finally:
            setns_fd(home)
    finally:
        os.close(home)


def is_placeholder(name: str) -> bool:
    """An empty regular file at ``/run/netns/<name>``: what :func:`new_netns` leaves if it is
    killed between taking the name and bind-mounting the namespace onto it."""
    try:
        st = os.lstat(netns_path(name))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def assert_socket_in(sock: socket.socket | int, expected_cookie: int, what: str) -> None:
    """Refuse to write through a socket that is not in the namespace we meant to configure."""
    got = socket_cookie(sock)
    if got != expected_cookie:
        raise NetnsError(errno.EXDEV, f"{what}: socket is in netns cookie {got}, expected {expected_cookie}; refusing to write")


def create_netns(name: str) -> None:
    """Create ``/run/netns/<name>`` like ``ip netns add``, from this thread, without forking.

    The thread unshares a fresh netns, bind-mounts ``/proc/thread-self/ns/net`` onto the
    name, and returns to where it was. Raises FileExistsError if the name is taken.
    """
    with new_netns(name):
        pass


@contextlib.contextmanager
def new_netns(name: str, before_name: Callable[[], None] | None = None) -> Iterator[None]:
    """Create ``name`` like :func:`create_netns` and run the body with the calling thread
    *inside* it, then return the thread where it was.

    Saves the open + two ``setns`` of a separate ``in_netns`` when the creator configures the
    namespace right away (apply does, once per pod). If the body raises, the namespace stays:
    the caller's ledger knows it and destroys it.

    The namespace exists, nameless, before it takes its name: ``before_name`` runs in it then
    (the thread is inside), which is where apply records its identity (cookie) in the ledger. So
    whatever name this process is killed at, a namespace under a recorded name either has the
    recorded cookie (ours) or not (someone else's); a namespace killed before it had a name
    dies with the thread. Raises FileExistsError if the name is taken (after ``before_name``).
    """
    _ensure_run_netns_shared()
    path = netns_path(name)
    home = own_netns_fd()
    try:
        _check(_libc.unshare(CLONE_NEWNET), f"unshare for {name!r}")
        try:
            if before_name is not None:
                before_name()
            if testhooks.ARMED:
                testhooks.point(f"netns:{name}")
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o444)
            os.close(fd)
            try:
                src = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net".encode()
                _check(_libc.mount(src, str(path).encode(), b"none", MS_BIND, None), f"bind-mount netns {name!r}")
            except BaseException:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise
        except BaseException:
            setns_fd(home)  # the nameless namespace goes with the last reference to it
            raise
        try:
            yield
        finally:
            setns_fd(home)
    finally:
        os.close(home)


def delete_netns(name: str) -> bool:
    """Remove a named namespace like ``ip netns delete``; True if it existed."""
    path = netns_path(name)
    try:
        os.lstat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR):  # (a name that cannot exist)
            return False
        raise
    ret = _libc.umount2(str(path).encode(), MNT_DETACH)
    if ret != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        err = ctypes.get_errno()
        raise NetnsError(err, f"umount netns {name!r}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def list_netns() -> list[str]:
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir())


_shared_done = False


def _ensure_run_netns_shared() -> None:
    """Make /run/netns a shared mount point, as iproute2 does, so mounts propagate to
    mount namespaces created later by ``ip netns exec``."""
    global _shared_done
    if _shared_done:
        return
    NETNS_RUN_DIR.mkdir(parents=True, exist_ok=True)
    MS_SHARED, MS_REC = 1 << 20, 16384
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == str(NETNS_RUN_DIR) for line in f)
    if not mounted:
        _check(_libc.mount(str(NETNS_RUN_DIR).encode(), str(NETNS_RUN_DIR).encode(), b"none", MS_BIND | MS_REC, None),
               "bind /run/netns")
    # ignore failure: a private /run/netns only affects propagation into other mount namespaces
    _libc.mount(b"none", str(NETNS_RUN_DIR).encode(), b"none", MS_SHARED | MS_REC, None)
    _shared_done = True
