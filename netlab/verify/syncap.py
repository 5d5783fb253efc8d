"""A lean capture for `netlab trace`: only TCP SYNs and Geneve frames, and no scapy.

Why not :class:`netlab.verify.sniff.Capture`: importing it loads scapy (0.5 s, and 1 s on a busy
2-core box), which alone would eat the 1 s budget of a trace. A trace needs far less: one
AF_PACKET socket per (netns, iface), opened by the calling thread while inside that netns (a
socket stays in the namespace it was made in), a fixed classic-BPF program written out below
instead of compiled by libpcap, and one epoll thread reading frames as they come.

Timestamps: the kernel's realtime receive stamp when it has one. A locally sent TCP segment
carries its earliest-departure time instead (CLOCK_MONOTONIC, and it survives forwarding, so
several hops would share it); for those the read time is used, as ``sniff`` does, which is why
frames are read at once by a thread rather than drained at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Literal

from netlab.kernel.ns import assert_socket_in, current_cookie, in_netns

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
SCM_TIMESTAMPNS = SO_TIMESTAMPNS

# ip and not a fragment and ((tcp and flags & (SYN|ACK) == SYN) or (udp dst port 6081))
_PROG = [
    (0x28, 0, 0, 12),       # 0  ldh [12]            ethertype
    (0x15, 0, 12, 0x0800),  # 1  jeq IPv4 ? 2 : drop
    (0x28, 0, 0, 20),       # 2  ldh [20]            flags/fragment offset
    (0x45, 10, 0, 0x1FFF),  # 3  jset frag ? drop : 4
    (0xB1, 0, 0, 14),       # 4  ldxb 4*([14]&0xf)   X = IP header length
    (0x30, 0, 0, 23),       # 5  ldb [23]            protocol
    (0x15, 0, 3, 6),        # 6  jeq TCP ? 7 : 10
    (0x50, 0, 0, 27),       # 7  ldb [x+27]          TCP flags
    (0x54, 0, 0, 0x12),     # 8  and SYN|ACK
    (0x15, 3, 4, 0x02),     # 9  jeq SYN ? accept : drop
    (0x15, 0, 3, 17),       # 10 jeq UDP ? 11 : drop
    (0x48, 0, 0, 16),       # 11 ldh [x+16]          UDP destination port
    (0x15, 0, 1, 6081),     # 12 jeq 6081 ? accept : drop
    (0x06, 0, 0, 0x40000),  # 13 accept (256 KiB)
    (0x06, 0, 0, 0),        # 14 drop
]
BPF_SYN_OR_GENEVE = b"".join(struct.pack("HBBI", *i) for i in _PROG)


@dataclass
class Frame:
    """Same attribute names as ``sniff.Captured``, so code can take either."""

    netns: str
    iface: str
    direction: Literal["in", "out"]
    timestamp: float
    raw: bytes


def _attach(sock: socket.socket, insns: bytes) -> None:
    buf = ctypes.create_string_buffer(insns, len(insns))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(insns) // 8, ctypes.addressof(buf)))


class SynCapture:
    """Sockets on ``targets``; :attr:`packets` is what has been read so far, in time order."""

    def __init__(self, targets: list[tuple[str, str]]) -> None:
        self.targets = targets
        self.socks: list[tuple[socket.socket, str, str]] = []
        self.missing: list[tuple[str, str]] = []  # interfaces the plan names but the kernel lacks
        self.frames: list[Frame] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

    def start(self) -> "SynCapture":
        by_ns: dict[str, list[str]] = {}
        for ns, iface in self.targets:
            by_ns.setdefault(ns, []).append(iface)
        try:
            for ns, ifaces in by_ns.items():
                with in_netns(ns):
                    cookie = current_cookie()
                    for iface in ifaces:
                        s = self._open(ns, iface, cookie)
                        if s is not None:
                            self.socks.append((s, ns, iface))
        except BaseException:
            self.stop()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="netlab-trace-capture", daemon=True)
        self._thread.start()
        return self

    def _open(self, ns: str, iface: str, cookie: int) -> socket.socket | None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # proto 0: receives nothing until bound
        try:
            assert_socket_in(s, cookie, f"trace capture {ns}/{iface}")
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            _attach(s, BPF_SYN_OR_GENEVE)
            s.bind((iface, ETH_P_ALL))
            s.setblocking(False)
            return s
        except OSError as e:
            s.close()
            if e.errno == errno.ENODEV:
                self.missing.append((ns, iface))
                return None
            raise

    def _run(self) -> None:
        ep = select.epoll()
        fds = {s.fileno(): (s, ns, iface) for s, ns, iface in self.socks}
        for fd in fds:
            ep.register(fd, select.EPOLLIN)
        ep.register(self._wake_r, select.EPOLLIN)
        try:
            while True:
                for fd, _ in ep.poll():
                    if fd == self._wake_r:
                        for s, ns, iface in self.socks:
                            self._read(s, ns, iface)
                        return
                    self._read(*fds[fd])
        finally:
            ep.close()

    def _read(self, s: socket.socket, ns: str, iface: str) -> None:
        anc = socket.CMSG_SPACE(16)
        new: list[Frame] = []
        while True:
            try:
                data, cmsgs, _, addr = s.recvmsg(65536, anc)
            except (BlockingIOError, InterruptedError):
                break
            ts = time.time()
            for level, kind, payload in cmsgs:
                if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(payload) >= 16:
                    sec, nsec = struct.unpack_from("qq", payload)
                    if sec > 1_000_000_000:  # realtime; a monotonic departure time is not comparable
                        ts = sec + nsec / 1e9
            new.append(Frame(ns, iface, "out" if addr[2] == PACKET_OUTGOING else "in", ts, data))
        if new:
            with self._lock:
                self.frames += new

    @property
    def packets(self) -> list[Frame]:
        with self._lock:
            return sorted(self.frames, key=lambda f: f.timestamp)

    def stop(self) -> list[Frame]:
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        # Closing a packet socket waits for an RCU grace period (synchronize_net), ~15 ms each:
        # serially that is half a second for 40 sockets; closed from parallel threads the
        # grace periods overlap.
        closers = [threading.Thread(target=s.close, daemon=True) for s, _, _ in self.socks]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
        self.socks = []
        return sorted(self.frames, key=lambda f: f.timestamp)
