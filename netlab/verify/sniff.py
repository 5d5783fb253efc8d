"""Capture packets on several (netns, iface) pairs at once, from inside those namespaces.

Why not scapy's ``sniff``: an AF_PACKET socket belongs to the namespace it was created in, and
Python 3.11 can only move a *thread* (``in_netns``), so every socket must be opened by a thread
that is inside its namespace at that moment. One collector thread does that for every target
(hop in, open, hop back; microseconds each), then serves all sockets with one ``epoll``. So a
capture of N interfaces costs one thread, and :meth:`Capture.start` returns only once every
socket is bound and filtered: a packet sent after ``start()`` is never missed.

Sockets are created with protocol 0 (they receive nothing), get their BPF filter, and only then
are bound to ``(iface, ETH_P_ALL)``; so no unfiltered frame or frame from another interface can
sneak in between ``socket()`` and ``bind()``. The BPF filter (tcpdump syntax, compiled by libpcap
for Ethernet) runs in the kernel; an optional Python predicate runs on the dissected scapy packet.

Frames are kept raw with their kernel receive timestamp (``SO_TIMESTAMPNS``) and dissected
lazily, because scapy dissection (~0.3-0.5 ms per frame here) would otherwise throttle the collector and drop
frames under load. ``wait_for`` lets a test wait for the packet it expects instead of sleeping.

    with Capture([("lab-node-a", "eth0"), ("lab-node-a", "istioout")], bpf="tcp or udp") as cap:
        ... make traffic ...
        cap.wait_for(lambda c: c.iface == "istioout" and TCP in c.pkt, timeout=2)
    for c in cap.packets:
        print(c.netns, c.iface, c.direction, c.timestamp, c.pkt.summary())
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import scapy.contrib.geneve  # noqa: F401 - binds UDP 6081 -> GENEVE so tunnel frames dissect fully
import scapy.layers.inet  # noqa: F401 - binds Ether -> IP -> TCP/UDP/ICMP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from netlab.kernel.ns import assert_socket_in, current_cookie, in_netns

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
DLT_EN10MB = 1
RCVBUF = 8 << 20
DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET|BPF_K 0: accept nothing
MAX_FRAME = 65535 + 14 + 4  # a GSO super-frame on a veth can carry up to 64 KiB of IP

Direction = Literal["in", "out"]
Target = tuple[str, str]  # (netns, iface)


class CaptureError(RuntimeError):
    """A capture could not start (no such namespace/interface, bad filter); names the target."""


@dataclass
class Captured:
    """One frame seen on ``iface`` in ``netns``.

    ``direction`` is ``out`` for frames the namespace sent on that interface (PACKET_OUTGOING)
    and ``in`` for everything it received. ``timestamp`` is the kernel's (CLOCK_REALTIME, s), so
    frames from different interfaces can be ordered along a packet's walk.
    """

    netns: str
    iface: str
    direction: Direction
    timestamp: float
    raw: bytes
    truncated: bool = False  # the frame did not fit the receive buffer (not expected: 64 KiB)
    _pkt: Packet | None = field(default=None, repr=False)

    @property
    def pkt(self) -> Packet:
        """The frame dissected by scapy (done once, on first use); ``time``/``sniffed_on`` set."""
        if self._pkt is None:
            p = Ether(self.raw)
            p.time = self.timestamp
            p.sniffed_on = f"{self.netns}/{self.iface}"
            self._pkt = p
        return self._pkt

    def where(self) -> str:
        return f"{self.netns}/{self.iface}/{self.direction}"

    def __str__(self) -> str:
        return f"{self.timestamp:.6f} {self.where()} {self.pkt.summary()}"


@lru_cache(maxsize=64)
def compile_bpf(expr: str) -> bytes:
    """Compile a tcpdump expression for Ethernet frames to classic-BPF instructions (8 bytes
    each, as ``struct sock_filter``). Cached: tests reuse a handful of filters."""
    from scapy.arch.common import compile_filter
    from scapy.error import Scapy_Exception

    try:
        prog = compile_filter(expr, linktype=DLT_EN10MB)
    except (Scapy_Exception, ImportError) as e:
        raise CaptureError(f"BPF filter {expr!r}: {e}") from None
    n = prog.bf_len
    return ctypes.string_at(ctypes.addressof(prog.bf_insns.contents), n * 8)


def _attach_bpf(sock: socket.socket, insns: bytes) -> None:
    """SO_ATTACH_FILTER with a ``struct sock_fprog {u16 len; struct sock_filter *filter}``."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    fprog = struct.pack("HL", len(insns) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _open_packet_socket(netns: str, iface: str, bpf: bytes | None) -> socket.socket:
    """Open an AF_PACKET socket on ``iface``; the calling thread must be inside ``netns``."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # proto 0: receives nothing yet
    try:
        assert_socket_in(sock, current_cookie(), f"capture socket {netns}/{iface}")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if bpf is not None:
            _attach_bpf(sock, bpf)
        try:
            sock.bind((iface, ETH_P_ALL))
        except OSError as e:
            if e.errno == errno.ENODEV:
                raise CaptureError(f"no interface {iface!r} in netns {netns!r}") from None
            raise
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


class Capture:
    """A running capture on ``targets`` (pairs of netns and interface name).

    ``bpf`` is a tcpdump expression applied in the kernel to every target; ``match`` is a Python
    predicate on :class:`Captured` applied when frames are read back (it may look at ``c.pkt``,
    ``c.iface``, ...). ``max_frames`` bounds memory for long captures (later frames are counted in
    ``overflow``, not kept).
    """

    def __init__(self, targets: Iterable[Target], *, bpf: str | None = None,
                 match: Callable[[Captured], bool] | None = None, max_frames: int = 200_000) -> None:
        self.targets: list[Target] = list(dict.fromkeys(targets))
        if not self.targets:
            raise CaptureError("nothing to capture: no (netns, iface) targets")
        self.bpf = bpf
        self.match = match
        self.max_frames = max_frames
        self.overflow = 0
        self._frames: list[Captured] = []
        self._cond = threading.Condition()
        self._socks: dict[int, tuple[socket.socket, str, str]] = {}
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._running = False
        self._start_err: BaseException | None = None
        self._done = threading.Event()  # collector has drained and detached every socket
        self.drops = 0  # kernel drops (PACKET_STATISTICS), summed at stop

    # ---- lifecycle ----
    def start(self, timeout: float = 5.0) -> Capture:
        """Open every socket (each inside its netns) and start collecting; returns when all are
        bound, or raises :class:`CaptureError` naming the target that failed."""
        if self._thread is not None:
            raise CaptureError("capture already started")
        insns = compile_bpf(self.bpf) if self.bpf else None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(insns, ready), name="netlab-capture", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise CaptureError(f"capture did not start within {timeout}s")
        if self._start_err is not None:
            self._thread.join(timeout)
            raise self._start_err
        self._running = True
        return self

    def stop(self, settle: float = 0.0) -> list[Captured]:
        """Stop collecting (after ``settle`` seconds for packets still in flight), drain what the
        sockets already hold, close them, and return the matching frames in time order."""
        if self._thread is None:
            return []
        if self._done.is_set():  # stopped already, or never got going
            return self.packets
        if settle > 0:
            time.sleep(settle)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._done.wait(10)
        self._running = False
        return self.packets

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._running

    # ---- results ----
    @property
    def packets(self) -> list[Captured]:
        """Matching frames so far (capture may still be running), in kernel-timestamp order."""
        with self._cond:
            frames = list(self._frames)
        out = [c for c in frames if self.match is None or self.match(c)]
        out.sort(key=lambda c: c.timestamp)
        return out

    def select(self, *, netns: str | None = None, iface: str | None = None, direction: Direction | None = None,
               where: Callable[[Captured], bool] | None = None) -> list[Captured]:
        """Matching frames narrowed down by target, direction and/or a predicate."""
        return [c for c in self.packets
                if (netns is None or c.netns == netns) and (iface is None or c.iface == iface)
                and (direction is None or c.direction == direction) and (where is None or where(c))]

    def wait_for(self, pred: Callable[[Captured], bool], timeout: float = 2.0, count: int = 1) -> list[Captured]:
        """Block until ``count`` matching frames satisfy ``pred`` (or ``timeout`` passes); returns
        those found, possibly fewer. Frames already captured count."""
        deadline = time.monotonic() + timeout
        seen = 0
        hits: list[Captured] = []
        while True:
            with self._cond:
                new = self._frames[seen:]
                seen += len(new)
            hits += [c for c in new if (self.match is None or self.match(c)) and pred(c)]
            if len(hits) >= count:
                return hits
            left = deadline - time.monotonic()
            if left <= 0 or self._done.is_set():
                return hits
            with self._cond:
                if len(self._frames) == seen:
                    self._cond.wait(min(left, 0.1))

    def write_pcap(self, path: str) -> None:
        """Write the matching frames to a pcap (``sniffed_on`` = netns/iface per packet)."""
        from scapy.utils import wrpcap

        wrpcap(path, [c.pkt for c in self.packets], linktype=DLT_EN10MB)

    # ---- collector thread ----
    def _run(self, insns: bytes | None, ready: threading.Event) -> None:
        ep = select.epoll()
        try:
            try:
                for netns, iface in self.targets:
                    with in_netns(netns):
                        s = _open_packet_socket(netns, iface, insns)
                    self._socks[s.fileno()] = (s, netns, iface)
                    ep.register(s.fileno(), select.EPOLLIN)
                ep.register(self._wake_r, select.EPOLLIN)
            except BaseException as e:  # noqa: BLE001 - handed to start()
                self._start_err = e if isinstance(e, CaptureError) else CaptureError(f"capture start: {e}")
                ready.set()
                return  # the finally below closes what was opened
            ready.set()
            stopping = False
            while not stopping:
                for fd, _ in ep.poll(1.0):
                    if fd == self._wake_r:
                        stopping = True
                    else:
                        self._drain(fd)
            for fd in list(self._socks):  # what arrived before the stop request is kept
                self._drain(fd)
        finally:
            socks = [s for s, _, _ in self._socks.values()]
            for s in socks:
                self.drops += _drops(s)
                with contextlib.suppress(OSError):
                    _attach_bpf(s, DROP_ALL)  # stops delivery at once, unlike close (below)
            self._socks.clear()
            ep.close()
            self._done.set()
            with self._cond:
                self._cond.notify_all()
            # Closing an AF_PACKET socket waits for an RCU grace period (packet_release ->
            # synchronize_net, ~10 ms each); that happens here, after stop() has returned.
            for s in socks:
                s.close()
            self._close_pipe()

    def _drain(self, fd: int) -> None:
        sock, netns, iface = self._socks[fd]
        got: list[Captured] = []
        while True:
            try:
                data, anc, flags, addr = sock.recvmsg(MAX_FRAME, 64)
            except (BlockingIOError, InterruptedError):
                break
            ts = time.time()
            for level, typ, val in anc:
                if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(val) >= 16:
                    sec, nsec = struct.unpack("qq", val[:16])
                    if sec > 1_000_000_000:  # a monotonic (EDT) stamp would not be comparable
                        ts = sec + nsec / 1e9
            direction: Direction = "out" if addr[2] == PACKET_OUTGOING else "in"
            got.append(Captured(netns, iface, direction, ts, data, bool(flags & socket.MSG_TRUNC)))
        if got:
            with self._cond:
                room = self.max_frames - len(self._frames)
                self._frames.extend(got[:max(room, 0)])
                self.overflow += max(len(got) - max(room, 0), 0)
                self._cond.notify_all()

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1


def _drops(sock: socket.socket) -> int:
    """Frames the kernel dropped for this socket (``tp_drops``; reading resets the counters)."""
    try:
        _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        return drops
    except OSError:
        return 0


def capture(targets: Sequence[Target], *, bpf: str | None = None,
            match: Callable[[Captured], bool] | None = None) -> Capture:
    """Start a :class:`Capture` and return it (use as a context manager or call ``stop()``)."""
    return Capture(targets, bpf=bpf, match=match).start()


__all__ = ["Capture", "CaptureError", "Captured", "capture", "compile_bpf"]
