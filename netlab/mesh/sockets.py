"""Socket tricks of the mesh proxies: transparent listeners, original destination, spoofed sources.

* TPROXY only hands packets to a listener with ``IP_TRANSPARENT`` (reference §4.2); the accepted
  socket's local address is then the original destination.
* Under REDIRECT (sidecars, §6) the local address is the proxy's own; ``SO_ORIGINAL_DST`` on the
  conntrack entry gives the original destination.
* ztunnel keeps the client's source IP by binding its upstream socket to that IP with
  ``IP_TRANSPARENT`` + ``IP_FREEBIND`` (ztunnel's ``freebind_connect``).
"""

from __future__ import annotations

import asyncio
import socket
import struct

IP_TRANSPARENT = 19
IP_FREEBIND = 15
SO_ORIGINAL_DST = 80

#: Accept-queue length of every proxy listener. A full queue drops the SYN (TcpExtListenDrops),
#: and the client retries it 1, 3, 7 s later: with asyncio's default of 100, a burst of 1000
#: connects (soak S1) waited 4-7 s at p99 and some timed out. The kernel caps it at
#: net.core.somaxconn (4096 by default in every netns).
LISTEN_BACKLOG = 4096


def listener(host: str, port: int, *, transparent: bool = False,
             backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A non-blocking TCP listening socket; ``transparent`` for TPROXY targets."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination the client meant: ``SO_ORIGINAL_DST`` (REDIRECT), else the local address
    (TPROXY), as ztunnel's ``orig_dst_addr_or_default`` does."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntoa(packed), port
    except OSError:
        ip, port = sock.getsockname()[:2]
        return ip, port


def upstream_socket(src_ip: str | None, *, transparent: bool = True) -> socket.socket:
    """A non-blocking socket bound to ``src_ip`` (spoofed when it is not ours), or unbound."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if src_ip is not None:
            if transparent:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            s.bind((src_ip, 0))
    except OSError:
        s.close()
        raise
    return s


async def connect(dst: tuple[str, int], src_ip: str | None = None, *, transparent: bool = True,
                  timeout: float = 10.0) -> socket.socket:
    """Connect a (possibly source-spoofed) socket; ztunnel's connect timeout is 10 s (§4.2).
    If the source equals the destination IP, connect without binding, as ztunnel does."""
    if src_ip == dst[0]:
        src_ip = None
    s = upstream_socket(src_ip, transparent=transparent)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, dst), timeout)
    except BaseException:
        s.close()
        raise
    return s
