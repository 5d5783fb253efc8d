"""Userspace Geneve relay: TAP devices <-> Geneve/UDP port 6081, wire-compatible with Linux.

The lab's kernel has no geneve module, so each Istio tunnel device (``istioin``/``istioout`` on
a node, ``pistioin``/``pistioout`` in the ztunnel netns; reference §1.3, §2.1) is a persistent
TAP created by the apply stage, and one relay process per netns moves frames::

    python -m netlab.geneve.encap --netns NS --tunnel DEV:VNI:REMOTE [--tunnel ...] [--log FILE]

* It enters NS first (``setns`` while still single-threaded, so the whole process lives there),
  attaches to each existing TAP (``TUNSETIFF IFF_TAP|IFF_NO_PI``; it refuses to create one) and
  binds ONE UDP socket to 0.0.0.0:6081 that all tunnels of the netns share, as the kernel's
  per-netns geneve socket does.
* TAP frame -> Geneve datagram to REMOTE:6081 (:mod:`netlab.geneve.wire` says what is on the
  wire and why). It is sent through a ``SOCK_RAW``/``IPPROTO_UDP`` socket so that the UDP source
  port can follow the inner flow like ``udp_flow_src_port`` does, while the kernel still builds
  the outer IPv4 header (routing-chosen source, TTL, ID, no DF, fragmentation). The raw
  socket's receive side is shut by a drop-all BPF filter.
* Datagram -> TAP only if its VNI belongs to a tunnel AND its outer source IP is that tunnel's
  REMOTE (``geneve_lookup``); everything else is counted and dropped.

Kernel behaviour that a TAP cannot reproduce (deliberate, documented differences):

* **Outer routing mark.** The kernel routes the outer packet with the *inner* skb mark
  (``fl4.flowi4_mark = skb->mark``); a TAP hands us bytes without the mark, so the outer packet
  leaves with mark 0. On the node this is moot: the outer source is HOST_IP, which the
  ``ztunnel-OUTPUT`` rule marks 0x220 anyway (§1.5), and the ztunnel netns has no mark rules
  for UDP.
* **MTU.** A kernel geneve device derives its MTU (underlay - 50) at creation; a TAP does not, so
  the apply stage must set the TAP MTU itself (``istio.GENEVE_IPV4_OVERHEAD``). The ready line
  reports each TAP's MTU. Oversized inner frames are fragmented on the outside as the kernel
  would do without DF; ``skb_tunnel_check_pmtu``'s ICMP "frag needed" is not generated.
* **Outer netfilter.** Both the kernel tunnel's and this relay's outer packets are locally
  generated, so they traverse OUTPUT/POSTROUTING on send and PREROUTING/INPUT on receive.

Loop: epoll over non-blocking fds, up to ``BATCH`` frames per readiness event, no per-packet
logging. SIGUSR1 writes a ``{"event": "counters", ...}`` JSON line to the log (or stdout);
SIGTERM/SIGINT stop it cleanly and write a final ``{"event": "exit", ...}`` line.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from netlab.geneve import wire
from netlab.istio import GENEVE_DST_PORT, GENEVE_PROTO_TEB
from netlab.netns import assert_socket_in, current_cookie, in_netns, setns

TUN_DEV = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_PERSIST = 0x0800
SIOCGIFHWADDR = 0x8927
SIOCGIFMTU = 0x8921
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0
IP_RECVTOS = 13
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

BATCH = 64  # frames/datagrams drained per readiness event before polling again
SOCK_BUF = 4 << 20
MAX_DATAGRAM = 65535
_ANC_SPACE = socket.CMSG_SPACE(4)


@dataclass(frozen=True)
class Tunnel:
    """One point-to-point geneve device: ``ip link add DEV type geneve id VNI remote REMOTE``."""

    dev: str
    vni: int
    remote: str

    @classmethod
    def parse(cls, spec: str) -> Tunnel:
        """``DEV:VNI:REMOTE``, e.g. ``istioout:1001:10.244.1.3``."""
        try:
            dev, vni, remote = spec.split(":")
            t = cls(dev, int(vni), str(ipaddress.IPv4Address(remote)))
        except ValueError as e:
            raise ValueError(f"bad tunnel spec {spec!r}, want DEV:VNI:REMOTE ({e})") from None
        if not 0 <= t.vni <= wire.VNI_MAX or not 0 < len(dev) < 16:
            raise ValueError(f"bad tunnel spec {spec!r}: VNI must be 0..{wire.VNI_MAX}, DEV 1..15 chars")
        return t

    def spec(self) -> str:
        return f"{self.dev}:{self.vni}:{self.remote}"


class _Port:
    """Runtime state of one tunnel (mutable counters, the TAP fd)."""

    __slots__ = ("tunnel", "fd", "mac", "mtu", "ifindex", "dest", "rx", "tx", "rx_bytes", "tx_bytes")

    def __init__(self, tunnel: Tunnel, fd: int, mac: bytes, mtu: int, ifindex: int) -> None:
        self.tunnel, self.fd, self.mac, self.mtu, self.ifindex = tunnel, fd, mac, mtu, ifindex
        self.dest = (tunnel.remote, 0)  # raw sockets ignore the port
        self.rx = self.tx = self.rx_bytes = self.tx_bytes = 0


class Encapsulator:
    """The relay. ``open()`` in the target netns (or from a thread inside it), then ``serve()``.

    ``stop()`` and ``request_counters()`` are safe from other threads and signal handlers.
    """

    DROP_KEYS = ("dropped_wrong_source", "dropped_wrong_vni", "dropped_malformed", "dropped_proto",
                 "dropped_critical", "dropped_loop", "dropped_ecn", "tx_errors")

    def __init__(self, tunnels: list[Tunnel], *, port: int = GENEVE_DST_PORT, log: IO[str] | None = None) -> None:
        if not tunnels:
            raise ValueError("no tunnels")
        keys = [(t.vni, t.remote) for t in tunnels]
        if len(set(keys)) != len(keys) or len({t.dev for t in tunnels}) != len(tunnels):
            raise ValueError("duplicate tunnel (the kernel refuses two devices with one VNI+remote: EBUSY)")
        self.tunnels = list(tunnels)
        self.port = port
        self.log = log
        self.drops = dict.fromkeys(self.DROP_KEYS, 0)
        self._ports: list[_Port] = []
        self._by_fd: dict[int, _Port] = {}
        self._by_key: dict[tuple[int, str], _Port] = {}
        self._vnis: set[int] = set()
        self._src_ports = wire.SourcePorts()
        self._udp: socket.socket | None = None
        self._raw: socket.socket | None = None
        self._ep: select.epoll | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._started = time.time()
        self._log_lock = threading.Lock()

    # ------------------------------------------------------------ setup
    def open(self) -> dict[str, Any]:
        """Attach TAPs and open sockets in the calling thread's netns; return the ready record."""
        cookie = current_cookie()
        try:
            udp = self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            assert_socket_in(udp, cookie, "geneve udp socket")
            udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCK_BUF)
            udp.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
            udp.bind(("0.0.0.0", self.port))
            udp.setblocking(False)

            raw = self._raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
            assert_socket_in(raw, cookie, "geneve raw socket")
            _attach_drop_all(raw)
            raw.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
            raw.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCK_BUF)
            raw.setblocking(False)

            for t in self.tunnels:
                p = _Port(t, *_attach_tap(t.dev, udp))
                self._ports.append(p)
                self._by_fd[p.fd] = p
                self._by_key[(t.vni, t.remote)] = p
                self._vnis.add(t.vni)

            ep = self._ep = select.epoll()
            ep.register(udp.fileno(), select.EPOLLIN)
            ep.register(self._wake_r, select.EPOLLIN)
            for p in self._ports:
                ep.register(p.fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        return self.ready_info()

    def ready_info(self) -> dict[str, Any]:
        return {
            "event": "ready",
            "pid": os.getpid(),
            "netns_cookie": current_cookie(),
            "port": self.port,
            "tunnels": [
                {"dev": p.tunnel.dev, "vni": p.tunnel.vni, "remote": p.tunnel.remote,
                 "ifindex": p.ifindex, "mac": p.mac.hex(":"), "mtu": p.mtu}
                for p in self._ports
            ],
        }

    # ------------------------------------------------------------ control
    def stop(self) -> None:
        self._wake(b"T")

    def request_counters(self) -> None:
        self._wake(b"U")

    def _wake(self, what: bytes) -> None:
        try:
            os.write(self._wake_w, what)
        except (BlockingIOError, OSError):
            pass

    def counters(self) -> dict[str, Any]:
        total_rx = sum(p.rx for p in self._ports)
        total_tx = sum(p.tx for p in self._ports)
        return {
            "rx": total_rx,
            "tx": total_tx,
            **self.drops,
            "uptime_s": round(time.time() - self._started, 3),
            "tunnels": {
                p.tunnel.dev: {"rx": p.rx, "tx": p.tx, "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes}
                for p in self._ports
            },
        }

    def emit(self, event: str, **extra: Any) -> None:
        line = json.dumps({"event": event, "pid": os.getpid(), **self.counters(), **extra})
        out = self.log or sys.stdout
        with self._log_lock:
            out.write(line + "\n")
            out.flush()

    # ------------------------------------------------------------ loop
    def serve(self) -> None:
        """Relay until ``stop()``. Level-triggered epoll; each ready fd is drained up to BATCH."""
        assert self._ep is not None and self._udp is not None, "open() first"
        ep, udp_fd, wake_r = self._ep, self._udp.fileno(), self._wake_r
        by_fd, from_tap, from_udp = self._by_fd, self._from_tap, self._from_udp
        while not self._stopping:
            try:
                events = ep.poll()
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            for fd, _ev in events:
                if fd == udp_fd:
                    from_udp()
                elif fd == wake_r:
                    self._on_wake()
                else:
                    from_tap(by_fd[fd])

    def _on_wake(self) -> None:
        try:
            cmds = os.read(self._wake_r, 256)
        except BlockingIOError:
            return
        if b"U" in cmds:
            self.emit("counters")
        if b"T" in cmds:
            self._stopping = True

    def _from_tap(self, p: _Port) -> None:
        read, fd, send = os.read, p.fd, self._raw.sendmsg  # type: ignore[union-attr]
        ports, hdr, tos_of, vni, dest = self._src_ports, wire.udp_geneve_header, wire.outer_tos, p.tunnel.vni, p.dest
        for _ in range(BATCH):
            try:
                frame = read(fd, MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as e:  # EBADFD/EIO if the device goes away under us
                if e.errno in (errno.EBADFD, errno.EIO, errno.ENXIO):
                    self.drops["tx_errors"] += 1
                    return
                raise
            h = hdr(ports(frame), vni, len(frame))
            tos = tos_of(frame)
            anc = [(socket.IPPROTO_IP, socket.IP_TOS, bytes((tos,)))] if tos else []
            try:
                send((h, frame), anc, 0, dest)
            except (BlockingIOError, OSError) as e:
                if not self._retry_send(e, h, frame, anc, dest):
                    continue
            p.tx += 1
            p.tx_bytes += len(frame)

    def _retry_send(self, err: OSError, h: bytes, frame: bytes, anc: list[tuple[int, int, bytes]],
                    dest: tuple[str, int]) -> bool:
        """Send buffer full (EAGAIN/ENOBUFS): wait briefly once for room, as a NIC queue would.
        Other errors (no route, EMSGSIZE) drop the frame like the kernel's tx_errors."""
        raw = self._raw
        assert raw is not None
        if err.errno in (errno.EAGAIN, errno.ENOBUFS):
            select.select([], [raw], [], 0.01)
            try:
                raw.sendmsg((h, frame), anc, 0, dest)
                return True
            except OSError:
                pass
        self.drops["tx_errors"] += 1
        return False

    def _from_udp(self) -> None:
        recv = self._udp.recvmsg  # type: ignore[union-attr]
        by_key, vnis, drops, write = self._by_key, self._vnis, self.drops, os.write
        unpack = wire._HDR.unpack_from
        for _ in range(BATCH):
            try:
                data, anc, _flags, addr = recv(MAX_DATAGRAM, _ANC_SPACE)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # ICMP error queued on the socket; not ours to act on
                continue
            if len(data) < wire.GENEVE_HLEN:
                drops["dropped_malformed"] += 1
                continue
            b0, b1, proto, vni = unpack(data)
            vni >>= 8
            if b0 >> 6 != wire.GENEVE_VERSION or proto not in wire.ACCEPTED_PROTOS:
                drops["dropped_malformed"] += 1
                continue
            p = by_key.get((vni, addr[0]))
            if p is None:
                drops["dropped_wrong_source" if vni in vnis else "dropped_wrong_vni"] += 1
                continue
            if proto != GENEVE_PROTO_TEB:
                drops["dropped_proto"] += 1
                continue
            if b1 & 0x40:  # critical option present; we understand none
                drops["dropped_critical"] += 1
                continue
            off = wire.GENEVE_HLEN + (b0 & 0x3F) * 4
            if len(data) < off + wire.ETH_HLEN:
                drops["dropped_malformed"] += 1
                continue
            if data[off + 6:off + 12] == p.mac:  # our own frame looped back
                drops["dropped_loop"] += 1
                continue
            frame: bytes | bytearray | memoryview = memoryview(data)[off:]
            if anc:
                tos = anc[0][2][0]
                if tos & wire.ECN_MASK:
                    frame = bytearray(frame)
                    if not wire.ecn_decapsulate(tos, frame):
                        drops["dropped_ecn"] += 1
                        continue
            try:
                write(p.fd, frame)
            except OSError:
                drops["tx_errors"] += 1
                continue
            p.rx += 1
            p.rx_bytes += len(frame)

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        for p in self._ports:
            os.close(p.fd)
        self._ports.clear()
        self._by_fd.clear()
        for s in (self._udp, self._raw):
            if s is not None:
                s.close()
        self._udp = self._raw = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Encapsulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- kernel helpers

def _attach_tap(dev: str, ctl: socket.socket) -> tuple[int, bytes, int, int]:
    """Open ``/dev/net/tun`` and attach to the existing TAP ``dev`` (in the caller's netns).

    TUNSETIFF on a missing name would silently *create* a non-persistent TAP, so existence is
    checked first and IFF_PERSIST after. Returns (fd, mac, mtu, ifindex).
    """
    try:
        ifindex = socket.if_nametoindex(dev)
    except OSError:
        raise FileNotFoundError(errno.ENODEV, f"TAP device {dev!r} does not exist in this netns "
                                "(the apply stage creates it: kind='tuntap' mode='tap')") from None
    fd = os.open(TUN_DEV, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", dev.encode(), IFF_TAP | IFF_NO_PI)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            raise OSError(e.errno, f"attach to TAP {dev!r}: {e.strerror}"
                          + (" (already attached by another process?)" if e.errno == errno.EBUSY else "")) from None
        flags = struct.unpack_from("16sH", fcntl.ioctl(fd, TUNGETIFF, bytes(40)))[1]
        if not flags & IFF_TAP or not flags & IFF_PERSIST:
            raise OSError(errno.EINVAL, f"{dev!r} is not a persistent TAP device (flags {flags:#x})")
        q = struct.pack("16s24x", dev.encode())
        mac = fcntl.ioctl(ctl.fileno(), SIOCGIFHWADDR, q)[18:24]
        mtu = struct.unpack_from("i", fcntl.ioctl(ctl.fileno(), SIOCGIFMTU, q), 16)[0]
        return fd, mac, mtu, ifindex
    except BaseException:
        os.close(fd)
        raise


def _attach_drop_all(sock: socket.socket) -> None:
    """Classic BPF ``ret #0`` so the raw send socket never queues copies of incoming UDP."""
    insn = (ctypes.c_ubyte * 8).from_buffer_copy(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K, 0
    prog = struct.pack("HP", 1, ctypes.addressof(insn))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


# ---------------------------------------------------------------- entry points

def start(netns: str, tunnels: list[Tunnel], *, log: IO[str] | None = None,
          port: int = GENEVE_DST_PORT) -> Encapsulator:
    """Library use: open a relay whose fds live in ``netns`` (the calling thread returns home
    afterwards). Run ``serve()`` in a thread; ``stop()`` ends it; ``close()`` releases the fds."""
    enc = Encapsulator(tunnels, port=port, log=log)
    with in_netns(netns):
        enc.open()
    return enc


def run(netns: str, tunnels: list[Tunnel], *, log: IO[str] | None = None, out: IO[str] | None = None,
        port: int = GENEVE_DST_PORT) -> dict[str, Any]:
    """Open, print the ready line to ``out`` (stdout), serve until SIGTERM/SIGINT/``stop()``.

    Signal handlers are installed only when called from the main thread. Returns the counters.
    """
    out = out or sys.stdout
    enc = start(netns, tunnels, log=log, port=port)
    old: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        handlers: dict[signal.Signals, Callable[[], None]] = {signal.SIGTERM: enc.stop, signal.SIGINT: enc.stop,
                                                              signal.SIGUSR1: enc.request_counters}
        for sig, fn in handlers.items():
            old[sig] = signal.signal(sig, _calling(fn))
    try:
        out.write(json.dumps({**enc.ready_info(), "netns": netns}) + "\n")
        out.flush()
        enc.serve()
        enc.emit("exit")
        return enc.counters()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        enc.close()


def _calling(fn: Callable[[], None]) -> Callable[[int, Any], None]:
    """A signal handler that calls ``fn``."""
    return lambda _signum, _frame: fn()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netlab.geneve.encap", description=__doc__.split("\n")[0])
    ap.add_argument("--netns", required=True, help="network namespace to run in (/run/netns/NAME)")
    ap.add_argument("--tunnel", action="append", required=True, type=Tunnel.parse, metavar="DEV:VNI:REMOTE")
    ap.add_argument("--port", type=int, default=GENEVE_DST_PORT, help=argparse.SUPPRESS)
    ap.add_argument("--log", help="append counter lines here instead of stdout")
    args = ap.parse_args(argv)
    setns(args.netns)  # still single-threaded: from here the whole process is in the netns
    log = open(args.log, "a", buffering=1) if args.log else None
    try:
        run(args.netns, args.tunnel, log=log, port=args.port)
    except OSError as e:
        print(json.dumps({"event": "error", "pid": os.getpid(), "error": str(e)}), flush=True)
        return 1
    finally:
        if log:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
