"""A small pcapng writer: one interface per (netns, iface), kernel timestamps, direction flags.

Why pcapng and not pcap: a lab capture spans many namespaces, and plain pcap has no notion of
an interface, so Wireshark could not tell ``node-a/istioout`` from ``ztunnel/pistioout``. pcapng
gives every frame an interface (IDB) whose ``if_name`` we set to ``<netns>/<iface>``, keeps the
kernel's nanosecond timestamp (``if_tsresol`` = 9) so frames from different namespaces sort
along the packet's walk, and records in ``epb_flags`` whether the namespace sent or received
the frame (the same frame is often seen leaving one netns and entering the next).

Only the blocks we need are written: SHB, IDB, EPB (pcapng spec, draft-ietf-opsawg-pcapng),
little-endian, one section. Every interface is declared up front, so interfaces that saw no
frame still show up in ``tshark -D``-like listings of the file.

    with open("f.pcapng", "wb") as f:
        w = PcapngWriter(f)
        i = w.add_interface("lab-node-a/eth0")
        w.write_packet(i, time.time_ns(), frame, direction="out")
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal, Protocol

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6, e.g. a TUN device in L3 mode

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D

_OPT_END = 0
_OPT_COMMENT = 1
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_EPB_FLAGS = 2

_DIR_BITS = {"in": 0b01, "out": 0b10}  # epb_flags bits 0-1: 01 inbound, 10 outbound

Direction = Literal["in", "out"]


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _options(opts: Sequence[tuple[int, bytes]]) -> bytes:
    if not opts:
        return b""
    return b"".join(_option(c, v) for c, v in opts) + struct.pack("<HH", _OPT_END, 0)


def _block(btype: int, body: bytes) -> bytes:
    """Type, total length, body (already 32-bit aligned), total length again."""
    assert len(body) % 4 == 0
    total = len(body) + 12
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


@dataclass(frozen=True)
class Interface:
    """One IDB. ``name`` is what Wireshark shows as ``frame.interface_name``."""

    name: str
    linktype: int = LINKTYPE_ETHERNET
    description: str | None = None
    snaplen: int = 0  # 0: no limit (GSO frames on a veth can be ~64 KiB)


class PcapngWriter:
    """Writes one pcapng section to a binary file object. Interfaces may be added at any time
    before the first packet that uses them (the spec requires the IDB to precede its EPBs)."""

    def __init__(self, f: BinaryIO, *, application: str = "netlab", comment: str | None = None) -> None:
        self._f = f
        self.interfaces: list[Interface] = []
        self.frames = 0
        opts: list[tuple[int, bytes]] = [(_SHB_USERAPPL, application.encode())]
        if comment:
            opts.append((_OPT_COMMENT, comment.encode()))
        body = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + _options(opts)
        f.write(_block(_SHB, body))

    def add_interface(self, name: str, linktype: int = LINKTYPE_ETHERNET, description: str | None = None,
                      snaplen: int = 0) -> int:
        """Declare an interface; returns its id (index) for :meth:`write_packet`."""
        iface = Interface(name, linktype, description, snaplen)
        opts: list[tuple[int, bytes]] = [(_IF_NAME, name.encode()), (_IF_TSRESOL, bytes([9]))]
        if description:
            opts.append((_IF_DESCRIPTION, description.encode()))
        body = struct.pack("<HHI", linktype, 0, snaplen) + _options(opts)
        self._f.write(_block(_IDB, body))
        self.interfaces.append(iface)
        return len(self.interfaces) - 1

    def write_packet(self, if_id: int, ts_ns: int, data: bytes, *, direction: Direction | None = None,
                     orig_len: int | None = None, comment: str | None = None) -> None:
        """One EPB. ``ts_ns`` is nanoseconds since the epoch (the IDBs say ``if_tsresol`` = 9)."""
        if not 0 <= if_id < len(self.interfaces):
            raise ValueError(f"interface id {if_id} was not added (have {len(self.interfaces)})")
        if ts_ns < 0:
            raise ValueError("timestamp before the epoch")
        opts: list[tuple[int, bytes]] = []
        if direction is not None:
            opts.append((_EPB_FLAGS, struct.pack("<I", _DIR_BITS[direction])))
        if comment:
            opts.append((_OPT_COMMENT, comment.encode()))
        body = (struct.pack("<IIIII", if_id, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data),
                            len(data) if orig_len is None else orig_len)
                + _pad4(data) + _options(opts))
        self._f.write(_block(_EPB, body))
        self.frames += 1


def seconds_to_ns(ts: float) -> int:
    """A float epoch timestamp to integer nanoseconds, splitting off the whole seconds first so
    the fraction keeps what precision the float has (about 0.2 µs at today's epoch)."""
    sec = int(ts)
    return sec * 1_000_000_000 + round((ts - sec) * 1e9)


class _Frame(Protocol):
    """What is written of a captured frame (``netlab.verify.sniff.Captured`` has it)."""

    netns: str
    iface: str
    direction: Direction
    raw: bytes

    @property
    def timestamp(self) -> float: ...


def write_frames(path: str, frames: Iterable[_Frame], interfaces: Sequence[tuple[str, str]] = (), *,
                 linktypes: dict[tuple[str, str], int] | None = None,
                 descriptions: dict[tuple[str, str], str] | None = None) -> dict[tuple[str, str], int]:
    """Write :class:`netlab.verify.sniff.Captured`-like frames to ``path``, one IDB per
    (netns, iface) named ``<netns>/<iface>``. ``interfaces`` are declared first (in that order,
    also when they saw nothing); frames on others get an IDB too. Frames are written in
    timestamp order. Returns the frame count per (netns, iface)."""
    linktypes = linktypes or {}
    descriptions = descriptions or {}
    ids: dict[tuple[str, str], int] = {}
    counts: dict[tuple[str, str], int] = {}
    ordered = sorted(frames, key=lambda c: c.timestamp)
    with open(path, "wb") as f:
        w = PcapngWriter(f)

        def declare(key: tuple[str, str]) -> int:
            if key not in ids:
                ids[key] = w.add_interface(f"{key[0]}/{key[1]}", linktypes.get(key, LINKTYPE_ETHERNET),
                                           descriptions.get(key))
                counts[key] = 0
            return ids[key]

        for key in interfaces:
            declare(key)
        for c in ordered:
            key = (c.netns, c.iface)
            w.write_packet(declare(key), getattr(c, "timestamp_ns", None) or seconds_to_ns(c.timestamp), c.raw, direction=c.direction)
            counts[key] += 1
    return counts


__all__ = ["Interface", "LINKTYPE_ETHERNET", "LINKTYPE_RAW", "PcapngWriter", "seconds_to_ns", "write_frames"]
