"""Capture packets on several (netns, iface) pairs at once, from inside those namespaces.

The one capture engine of netlab: tests and ``netlab capture`` use it with tcpdump filters and
scapy dissection, ``netlab trace`` with a fixed SYN/Geneve filter and no scapy at all (its whole
CLI has a 1 s budget).

Why not scapy's ``sniff``: an AF_PACKET socket belongs to the namespace it was created in, and
Python 3.11 can only move a *thread* (``in_netns``), so every socket must be opened by a thread
that is inside its namespace at that moment. One collector thread does that for every target
(one hop per namespace, microseconds), then serves all sockets with one ``epoll``. So a
capture of N interfaces costs one thread, and :meth:`Capture.start` returns only once every
socket is bound and filtered: a packet sent after ``start()`` is never missed.

Sockets are created with protocol 0 (they receive nothing), get their BPF filter, and only then
are bound to ``(iface, ETH_P_ALL)``; so no unfiltered frame or frame from another interface can
sneak in between ``socket()`` and ``bind()``. ``bpf`` is a tcpdump expression (compiled by
libpcap, via scapy) or a ready classic-BPF program such as :data:`BPF_SYN_OR_GENEVE`, which
needs neither. An optional Python predicate runs on the frames when they are read back.

Why it is cheap to start and stop:

* scapy is imported only when a frame's ``.pkt`` is used or a tcpdump expression is compiled:
  the import alone takes 0.5 s (1 s on a busy 2-core box). Frames are kept raw and dissected
  lazily anyway, since dissection (~0.3-0.5 ms per frame) would throttle the collector.
* Closing an AF_PACKET socket waits for an RCU grace period (``packet_release`` ->
  ``synchronize_net``, ~15 ms): half a second for 40 sockets one by one. They are closed from
  parallel threads, whose grace periods overlap, after :meth:`Capture.stop` has returned.

Timestamps are the kernel's receive stamps (``SO_TIMESTAMPNS``, CLOCK_REALTIME), kept as integer
nanoseconds (``timestamp_ns``; a float of epoch seconds keeps only ~0.2 us, pcapng stores ns).
A locally sent TCP segment carries its earliest-departure time instead (CLOCK_MONOTONIC, kept
across forwarding, so several hops would share it); for those the read time is used, which is
why a thread reads frames as they come rather than draining sockets at the end.

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
from typing import TYPE_CHECKING, Literal

from netlab.netns import assert_socket_in, current_cookie, in_netns

if TYPE_CHECKING:
    from scapy.packet import Packet

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
DLT_EN10MB = 1
RCVBUF = 8 << 20
MAX_FRAME = 65535 + 14 + 4  # a GSO super-frame on a veth can carry up to 64 KiB of IP
NS = 1_000_000_000


def _bpf(*insns: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("HBBI", *i) for i in insns)  # struct sock_filter


DROP_ALL = _bpf((0x06, 0, 0, 0))  # ret 0: accept nothing
# "ip and not ip[6:2] & 0x1fff != 0 and (tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn or udp dst
# port 6081)", written out so that `netlab trace` needs no libpcap/scapy: the SYN of every TCP
# leg, and Geneve frames (whose inner SYN the reader picks out).
BPF_SYN_OR_GENEVE = _bpf(
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
)

Direction = Literal["in", "out"]
_Epoll = select.epoll  # (inside Capture, ``select`` is its method)
Target = tuple[str, str]  # (netns, iface)


class CaptureError(RuntimeError):
    """A capture could not start (no such namespace/interface, bad filter); names the target."""


class _NoInterface(CaptureError):
    pass


@lru_cache(maxsize=1)
def _ether() -> type[Packet]:
    """scapy's Ether with IP/TCP/UDP/ICMP and UDP 6081 -> GENEVE bound (imported on first use)."""
    import scapy.contrib.geneve  # noqa: F401 - binds UDP 6081 -> GENEVE so tunnel frames dissect fully
    import scapy.layers.inet  # noqa: F401 - binds Ether -> IP -> TCP/UDP/ICMP
    from scapy.layers.l2 import Ether

    return Ether


@dataclass(slots=True)
class Captured:
    """One frame seen on ``iface`` in ``netns``.

    ``direction`` is ``out`` for frames the namespace sent on that interface (PACKET_OUTGOING)
    and ``in`` for everything it received. ``timestamp_ns`` is the kernel's (CLOCK_REALTIME), so
    frames from different interfaces can be ordered along a packet's walk; ``timestamp`` is the
    same in float seconds.
    """

    netns: str
    iface: str
    direction: Direction
    timestamp_ns: int
    raw: bytes
    truncated: bool = False  # the frame did not fit the receive buffer (not expected: 64 KiB)
    _pkt: Packet | None = field(default=None, repr=False, compare=False)

    @property
    def timestamp(self) -> float:
        return self.timestamp_ns / NS

    @property
    def pkt(self) -> Packet:
        """The frame dissected by scapy (done once, on first use); ``time``/``sniffed_on`` set."""
        if self._pkt is None:
            p = _ether()(self.raw)
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


def _open_packet_socket(netns: str, iface: str, bpf: bytes | None, cookie: int) -> socket.socket:
    """Open an AF_PACKET socket on ``iface``; the calling thread must be inside ``netns``,
    whose netns cookie is ``cookie``."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # proto 0: receives nothing yet
    try:
        assert_socket_in(sock, cookie, f"capture socket {netns}/{iface}")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if bpf is not None:
            _attach_bpf(sock, bpf)
        try:
            sock.bind((iface, ETH_P_ALL))
        except OSError as e:
            if e.errno == errno.ENODEV:
                raise _NoInterface(f"no interface {iface!r} in netns {netns!r}") from None
            raise
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def _close_all(socks: Sequence[socket.socket]) -> None:
    """Close sockets in parallel so their RCU grace periods overlap (see module doc). The
    threads are not daemons: an exiting interpreter waits for them instead of leaving the
    closes to the kernel's exit path, which does them one by one."""
    threads = []
    for s in socks:
        t = threading.Thread(target=s.close, name="netlab-capture-close")
        try:
            t.start()
            threads.append(t)
        except RuntimeError:  # interpreter shutting down: no new threads
            s.close()
    for t in threads:
        t.join()


class Capture:
    """A running capture on ``targets`` (pairs of netns and interface name).

    ``bpf`` is a tcpdump expression, or classic-BPF instructions as bytes (e.g.
    :data:`BPF_SYN_OR_GENEVE`), applied in the kernel to every target; ``match`` is a Python
    predicate on :class:`Captured` applied when frames are read back (it may look at ``c.pkt``,
    ``c.iface``, ...). ``max_frames`` bounds memory for long captures (later frames are counted in
    ``overflow``, not kept). ``skip_missing``: a target whose interface does not exist is listed
    in ``missing`` instead of failing the start (a trace captures what the plan names).
    """

    def __init__(self, targets: Iterable[Target], *, bpf: str | bytes | None = None,
                 match: Callable[[Captured], bool] | None = None, max_frames: int = 200_000,
                 skip_missing: bool = False) -> None:
        self.targets: list[Target] = list(dict.fromkeys(targets))
        if not self.targets:
            raise CaptureError("nothing to capture: no (netns, iface) targets")
        if isinstance(bpf, bytes) and (not bpf or len(bpf) % 8):
            raise CaptureError("BPF program: expected a non-empty multiple of 8 bytes (struct sock_filter)")
        self.bpf = bpf
        self.match = match
        self.max_frames = max_frames
        self.skip_missing = skip_missing
        self.missing: list[Target] = []
        self.overflow = 0
        self.drops = 0  # kernel drops (PACKET_STATISTICS), summed at stop
        self._frames: list[Captured] = []  # arrival order
        self._cond = threading.Condition()
        self._socks: dict[int, tuple[socket.socket, str, str]] = {}
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._running = False
        self._start_err: BaseException | None = None
        self._done = threading.Event()  # collector has drained and detached every socket

    # ---- lifecycle ----
    def start(self, timeout: float = 5.0) -> Capture:
        """Open every socket (each inside its netns) and start collecting; returns when all are
        bound, or raises :class:`CaptureError` naming the target that failed."""
        if self._thread is not None:
            raise CaptureError("capture already started")
        insns = self.bpf if isinstance(self.bpf, bytes) else compile_bpf(self.bpf) if self.bpf else None
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
        sockets already hold, and return the matching frames in time order. The sockets are
        closed in the background."""
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
        out.sort(key=lambda c: c.timestamp_ns)
        return out

    def since(self, n: int) -> list[Captured]:
        """Frames read after the first ``n``, in arrival order, ``match`` not applied: a poller
        takes only what is new (a timestamp-sorted list may grow in the middle)."""
        with self._cond:
            return self._frames[n:]

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
            new = self.since(seen)
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
    def _open_all(self, insns: bytes | None, ep: _Epoll) -> None:
        by_ns: dict[str, list[str]] = {}
        for netns, iface in self.targets:
            by_ns.setdefault(netns, []).append(iface)
        for netns, ifaces in by_ns.items():
            with in_netns(netns):
                cookie = current_cookie()
                for iface in ifaces:
                    try:
                        s = _open_packet_socket(netns, iface, insns, cookie)
                    except _NoInterface:
                        if not self.skip_missing:
                            raise
                        self.missing.append((netns, iface))
                        continue
                    self._socks[s.fileno()] = (s, netns, iface)
                    ep.register(s.fileno(), select.EPOLLIN)

    def _run(self, insns: bytes | None, ready: threading.Event) -> None:
        ep = select.epoll()
        try:
            try:
                self._open_all(insns, ep)
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
            _close_all(socks)  # after stop() has returned
            self._close_pipe()

    def _drain(self, fd: int) -> None:
        sock, netns, iface = self._socks[fd]
        got: list[Captured] = []
        while True:
            try:
                data, anc, flags, addr = sock.recvmsg(MAX_FRAME, 64)
            except (BlockingIOError, InterruptedError):
                break
            ts = time.time_ns()
            for level, typ, val in anc:
                if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(val) >= 16:
                    sec, nsec = struct.unpack_from("qq", val)
                    if sec > 1_000_000_000:  # a monotonic (EDT) stamp would not be comparable
                        ts = sec * NS + nsec
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
        return int(drops)
    except OSError:
        return 0


def capture(targets: Sequence[Target], *, bpf: str | bytes | None = None,
            match: Callable[[Captured], bool] | None = None) -> Capture:
    """Start a :class:`Capture` and return it (use as a context manager or call ``stop()``)."""
    return Capture(targets, bpf=bpf, match=match).start()


__all__ = ["BPF_SYN_OR_GENEVE", "Capture", "CaptureError", "Captured", "capture", "compile_bpf"]
