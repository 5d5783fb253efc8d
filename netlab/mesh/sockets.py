"""Every socket the mesh proxies make: listeners, accepted sockets, upstream sockets.

* TPROXY only hands packets to a listener with ``IP_TRANSPARENT`` (reference §4.2); the accepted
  socket's local address is then the original destination.
* Under REDIRECT (sidecars, §6) the local address is the proxy's own; ``SO_ORIGINAL_DST`` on the
  conntrack entry gives the original destination.
* ztunnel keeps the client's source IP by binding its upstream socket to that IP with
  ``IP_TRANSPARENT`` + ``IP_FREEBIND`` (ztunnel's ``freebind_connect``).
* In-pod (inpod reference §3.2-§3.3): ztunnel makes every socket of an enrolled pod *inside*
  that pod's netns, marked ``SO_MARK 1337`` (:class:`PodSocketFactory`, ztunnel's
  ``InPodSocketFactory``); the listeners and upstream sockets below take it as ``make``.

Byte streams over these sockets are :mod:`netlab.mesh.relay`'s; this module stops at the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from netlab import netns as ns

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_TRANSPARENT = 75  # linux/in6.h; the socket module has no name for it
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)

#: Accept-queue length of every proxy listener. A full queue drops the SYN (TcpExtListenDrops),
#: and the client retries it 1, 3, 7 s later: with asyncio's default of 100, a burst of 1000
#: connects (soak S1) waited 4-7 s at p99 and some timed out. The kernel caps it at
#: net.core.somaxconn (4096 by default in every netns).
LISTEN_BACKLOG = 4096
#: How many already-waiting connections one accept step takes (see :func:`accept_backlog`).
ACCEPT_BATCH = 128

log = logging.getLogger(__name__)

Address = tuple[str, int]


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def set_nodelay(sock: socket.socket) -> None:
    """No Nagle: proxied request/response traffic must not wait for a full segment."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def set_linger_zero(sock: socket.socket | None) -> None:
    """Make the next close() send RST instead of FIN (how a reset is passed on to TCP)."""
    if sock is None:  # uvloop: the transport's handle is already closed
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


MakeSocket = Callable[[socket.AddressFamily, socket.SocketKind], socket.socket]


def listener(host: str, port: int, *, transparent: bool = False, backlog: int = LISTEN_BACKLOG,
             make: MakeSocket | None = None) -> socket.socket:
    """A non-blocking TCP listening socket; ``transparent`` for TPROXY targets (and in-pod, where
    ztunnel's listeners take connections for the client's address); ``make``: where it is made."""
    s = (make or socket.socket)(_family(host), socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def original_dst(sock: socket.socket) -> Address:
    """The destination the client meant: ``SO_ORIGINAL_DST`` (REDIRECT), else the local address
    (TPROXY), as ztunnel's ``orig_dst_addr_or_default`` does."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntoa(packed), port
    except OSError:
        ip, port = sock.getsockname()[:2]
        return ip, port


def client_socket(dest: Address, source: Address | None = None, transparent: bool = False,
                  make: MakeSocket | None = None) -> socket.socket:
    """A non-blocking, unconnected TCP socket like ztunnel's ``freebind_connect`` makes (ZT-PROXY, §4.2).

    ``transparent`` sets IP_TRANSPARENT + IP_FREEBIND so ``source`` may be a foreign (pod) IP.
    A source equal to the destination IP is not bound, as in ztunnel. ``make``: where it is made.
    """
    family = _family(dest[0])
    sock = (make or socket.socket)(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if transparent:
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if source is not None and source[0] != dest[0]:
            sock.bind(source)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_socket(sock: socket.socket, dest: Address, timeout: float) -> None:
    """Connect ``sock`` within ``timeout`` s; a timeout is ``TimeoutError(ETIMEDOUT)``."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, dest), timeout)
    except TimeoutError:  # asyncio.TimeoutError is TimeoutError since 3.11
        raise TimeoutError(errno.ETIMEDOUT, f"connect to {dest[0]}:{dest[1]} timed out") from None
    except OSError as e:
        # without the frames below us: wait_for's frame holds the failed future, which holds
        # ``e``, so that traceback is a cycle pinning every caller's frame (streams, legs) too
        raise e.with_traceback(None) from None


def accept_backlog(lsock: socket.socket, limit: int = ACCEPT_BATCH) -> list[socket.socket]:
    """Whatever else is already waiting in a non-blocking listener's backlog (up to ``limit``).

    ``loop.sock_accept`` takes one connection per event-loop iteration; when 1000 clients
    connect at once and every iteration also relays data, the last ones wait seconds in the
    backlog (their TLS handshake clock already running on the other side). :func:`accept_forever`
    calls this after each ``sock_accept``, as libuv and Envoy accept in batches.
    """
    out: list[socket.socket] = []
    while len(out) < limit:
        try:
            sock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            break
        except (ConnectionAbortedError, ConnectionResetError):
            continue
        except OSError:
            break  # EMFILE & co: the caller's sock_accept reports it and backs off
        out.append(sock)
    return out


async def accept_forever(lsock: socket.socket, on_conn: Callable[[socket.socket], Coroutine[Any, Any, None]],
                         spawn: Callable[[Coroutine[Any, Any, None]], object], what: str = "accept") -> None:
    """Accept on ``lsock`` until cancelled; each connection's ``on_conn(sock)`` goes to ``spawn``
    (which keeps the task referenced). An accept error (EMFILE) is logged and retried shortly."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock, _ = await loop.sock_accept(lsock)
        except (ConnectionAbortedError, ConnectionResetError):
            continue
        except OSError as e:
            log.warning("%s: accept failed: %s", what, e)
            await asyncio.sleep(0.05)
            continue
        spawn(on_conn(sock))
        for s in accept_backlog(lsock):  # the whole backlog, not one per loop iteration
            spawn(on_conn(s))


class PodSocketFactory:
    """ztunnel's ``InPodSocketFactory`` (ZPOD config.rs L85-190, netns.rs L77-84): every socket of
    one enrolled pod is made inside the pod's netns -- the calling thread ``setns`` into the fd
    istio-cni handed over, ``socket()``, and back -- and gets ``SO_MARK`` (the in-pod mark 1337,
    which exempts it from the pod's REDIRECTs, §1.7); listeners also ``SO_REUSEPORT``.

    A socket stays in the netns it was made in, so only ``socket()`` itself runs there; binding,
    connecting and the event loop's work happen from ztunnel's own netns as for any socket.
    """

    def __init__(self, netns_fd: int, home_fd: int, mark: int) -> None:
        self.netns_fd, self.home_fd, self.mark = netns_fd, home_fd, mark
        self._inside = False

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Make every socket of the body in one visit to the pod's netns (a pod's five
        listeners: two ``setns`` instead of ten). The body must not await: the thread is the
        event loop's, and anything else it ran meanwhile would make its sockets in the pod."""
        if self._inside:
            yield
            return
        ns.setns_fd(self.netns_fd)
        self._inside = True
        try:
            yield
        finally:
            self._inside = False
            ns.setns_fd(self.home_fd)  # (raises only if the kernel refuses: then nothing is safe)

    def __call__(self, family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
        if self._inside:
            s = socket.socket(family, kind)
        else:
            ns.setns_fd(self.netns_fd)
            try:
                s = socket.socket(family, kind)
            finally:
                ns.setns_fd(self.home_fd)  # (raises only if the kernel refuses: then nothing is safe)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        except OSError:
            s.close()
            raise
        return s

    def listener(self, host: str, port: int, *, transparent: bool) -> socket.socket:
        """A TCP listener in the pod: SO_REUSEPORT (``INPOD_PORT_REUSE``), ``IP_TRANSPARENT`` best effort."""
        def make(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
            s = self(family, kind)
            s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            return s

        try:
            return listener(host, port, transparent=transparent, make=make)
        except PermissionError:  # IP_TRANSPARENT needs CAP_NET_ADMIN: ztunnel goes on without (ZPX L615-634)
            return listener(host, port, make=make)

    def udp(self, host: str, port: int = 0) -> socket.socket:
        """A bound, non-blocking UDP socket in the pod (DNS server, DNS forwarder)."""
        s = self(_family(host), socket.SOCK_DGRAM)
        try:
            if port:
                s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            s.bind((host, port))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s
