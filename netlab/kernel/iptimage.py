"""A whole iptables table written with one ``IPT_SO_SET_REPLACE``, from an image of the same
table made through libiptc in another netns (what ``iptables-legacy-restore`` sends, kept).

Why: an in-pod lab installs the same three tables (mangle, nat, raw: six chains and a dozen
rules, inpod reference §1.2) in every enrolled pod. Through libiptc each table costs a handle
(``iptc_init``: a raw socket, ``IPT_SO_GET_INFO`` and ``IPT_SO_GET_ENTRIES``, parsed into its
chain lists), the appends and a commit, all under the process-wide libiptc lock (``ipt.py``);
that was ~1 ms of CPU per pod and most of what makes the in-pod pods phase slower than 1.18's
(issue 24). The kernel takes a table as one blob, so the blob of the first pod's table, read
back after its commit, is the blob of every other pod's: each of them then costs one raw
socket, ``IPT_SO_GET_INFO`` and ``IPT_SO_GET_ENTRIES`` of the fresh table (is it the one the image
was written onto?) and one ``IPT_SO_SET_REPLACE``, outside the libiptc lock. The
kernel checks every entry of a replaced table again (``translate_table``: sizes, hooks, jumps,
each match's and target's ``checkentry``), as it does for libiptc's commit.

When an image is used (:func:`replace`): only for a table whose chains and rules are the ones
the image was made from (the key, :func:`image_key`), none of which refers to an ipset (a
set's index differs per netns, as in ``ipt._cacheable``), and only onto a table that is still
what the image's table was before it was written (its ``IPT_SO_GET_INFO`` and its entries, byte
for byte: a fresh netns's built-in table, policies and all). Anything else, and any error, and
the caller goes the libiptc way, which names the object the kernel refuses.

Layouts (``linux/netfilter_ipv4/ip_tables.h``, x86-64 and every 64-bit ABI the lab runs on):
``ipt_getinfo`` is 84 bytes; ``ipt_get_entries`` has its entries at offset 40; ``ipt_replace``
at offset 96, after a pointer (offset 88) to room for the old table's counters.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from netlab import netns as ns
from netlab.plan.types import IptChain, IptRule

SOL_IP = 0
IPT_SO_SET_REPLACE = 64  # IPT_BASE_CTL
IPT_SO_GET_INFO = 64
IPT_SO_GET_ENTRIES = 65
TABLE_NAME_LEN = 32  # XT_TABLE_MAXNAMELEN
NF_INET_NUMHOOKS = 5
COUNTERS_SIZE = 16  # struct xt_counters: two u64

_GETINFO = struct.Struct(f"={TABLE_NAME_LEN}sI{NF_INET_NUMHOOKS}I{NF_INET_NUMHOOKS}III")  # 84 bytes
_GET_ENTRIES_HEAD = 40  # name[32], size (u32), then the entries 8-aligned
_REPLACE_HEAD = struct.Struct(f"={TABLE_NAME_LEN}sIII{NF_INET_NUMHOOKS}I{NF_INET_NUMHOOKS}IIQ")  # 96 bytes

if ctypes.sizeof(ctypes.c_void_p) != 8 or _GETINFO.size != 84 or _REPLACE_HEAD.size != 96:
    raise ImportError("netlab.kernel.iptimage: a 64-bit ABI is assumed")  # (the offsets above are its)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]

#: the most images kept (one per distinct table content; an in-pod lab has three)
IMAGES_MAX = 64
_IMAGES: dict[tuple[object, ...], Image] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Info:
    """A table's ``IPT_SO_GET_INFO``: where each hook starts, how many entries, how big."""

    valid_hooks: int
    hook_entry: tuple[int, ...]
    underflow: tuple[int, ...]
    num_entries: int
    size: int


@dataclass(frozen=True)
class Image:
    """A table as the kernel holds it after libiptc wrote it, and what it was before."""

    before: Info  # the table it was written onto (a fresh netns's built-in table) ...
    before_entries: bytes  # ... byte for byte (the policies too, which its Info does not show)
    after: Info
    entries: bytes


def image_key(table: str, chains: Sequence[IptChain], rules: Sequence[IptRule]) -> tuple[object, ...] | None:
    """What makes two tables' content the same (their netns aside), or None if no image may
    stand for it (a rule naming an ipset, whose blob holds the set's index in one netns)."""
    if any("--match-set" in r.spec or "-m set" in r.spec for r in rules):
        return None
    return (table, tuple((c.chain, c.jump_from) for c in chains), tuple((r.chain, r.spec) for r in rules))


def _raw_socket(cookie: int, where: str) -> socket.socket:
    """The socket iptables talks through, made in the calling thread's netns, checked to be the
    one we mean to write (as ``ipt.TableTx.commit`` checks libiptc's)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
    try:
        ns.assert_socket_in(s, cookie, where)
    except BaseException:
        s.close()
        raise
    return s


def _getsockopt(s: socket.socket, opt: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    n = ctypes.c_uint(len(buf))
    if _libc.getsockopt(s.fileno(), SOL_IP, opt, buf, ctypes.byref(n)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getsockopt({opt}): {os.strerror(err)}")


def get_info(s: socket.socket, table: str) -> Info:
    buf = ctypes.create_string_buffer(table.encode(), _GETINFO.size)
    _getsockopt(s, IPT_SO_GET_INFO, buf)
    v = _GETINFO.unpack(buf.raw)
    return Info(v[1], tuple(v[2:7]), tuple(v[7:12]), v[12], v[13])


def get_entries(s: socket.socket, table: str, size: int) -> bytes:
    buf = ctypes.create_string_buffer(_GET_ENTRIES_HEAD + size)
    struct.pack_into(f"={TABLE_NAME_LEN}sI", buf, 0, table.encode(), size)
    _getsockopt(s, IPT_SO_GET_ENTRIES, buf)
    return buf.raw[_GET_ENTRIES_HEAD:]


def capture(table: str, key: tuple[object, ...], before: tuple[Info, bytes], cookie: int, where: str) -> None:
    """Keep the table libiptc just committed in the calling thread's netns as the image of
    ``key`` (``before``: the table as it was before that commit, :func:`table_state`)."""
    with _LOCK:
        if key in _IMAGES or len(_IMAGES) >= IMAGES_MAX:
            return
    s = _raw_socket(cookie, f"iptables -t {table} {where}")
    try:
        after = get_info(s, table)
        entries = get_entries(s, table, after.size)
    finally:
        s.close()
    with _LOCK:
        _IMAGES.setdefault(key, Image(before[0], before[1], after, entries))


def table_state(table: str, cookie: int, where: str) -> tuple[Info, bytes]:
    """The table as the kernel holds it in the calling thread's netns: its info and entries."""
    s = _raw_socket(cookie, f"iptables -t {table} {where}")
    try:
        info = get_info(s, table)
        return info, get_entries(s, table, info.size)
    finally:
        s.close()


def replace(table: str, key: tuple[object, ...], cookie: int, where: str) -> bool:
    """Write ``key``'s image over ``table`` in the calling thread's netns; False (nothing
    written) if there is no image yet or the table is not what the image was written onto."""
    with _LOCK:
        img = _IMAGES.get(key)
    if img is None:
        return False
    s = _raw_socket(cookie, f"iptables -t {table} {where}")
    try:
        now = get_info(s, table)
        if now != img.before or get_entries(s, table, now.size) != img.before_entries:
            return False
        counters = ctypes.create_string_buffer(max(1, now.num_entries) * COUNTERS_SIZE)  # the old ones land here
        a = img.after
        head = _REPLACE_HEAD.pack(table.encode(), a.valid_hooks, a.num_entries, a.size, *a.hook_entry, *a.underflow,
                                  now.num_entries, ctypes.addressof(counters))
        s.setsockopt(SOL_IP, IPT_SO_SET_REPLACE, head + img.entries)
        return True
    finally:
        s.close()


def forget() -> None:
    """Drop every image (tests: the next table is written through libiptc again)."""
    with _LOCK:
        _IMAGES.clear()


def images() -> int:
    with _LOCK:
        return len(_IMAGES)
