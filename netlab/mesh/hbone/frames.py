"""HTTP/2 framing (RFC 9113 §4.1, §6) for the frames an established HBONE tunnel lives on.

An HBONE tunnel, once its CONNECT is answered, is DATA one way and DATA the other, with
WINDOW_UPDATE returning credit, PING, RST_STREAM and GOAWAY now and then. Those frames are the
whole per-byte cost of the tunnel, so they are read and written here, without a frame object per
frame and without copying DATA payloads: :class:`FrameReader` cuts the decrypted byte stream
into frames and hands each DATA payload on as memoryview pieces of the bytes it was given (a
1 MiB DATA frame spread over 64 TLS records goes on in 64 pieces, as it arrives; flow control
counts bytes, so splitting a frame changes nothing). Every other frame (SETTINGS, HEADERS,
CONTINUATION, PRIORITY, PUSH_PROMISE, unknown types) is handed on whole, for the h2 library,
which keeps the connection preface, SETTINGS and HEADERS/HPACK
(:class:`netlab.mesh.hbone.connection.HboneConnection`).

Errors: :class:`FrameError` is a connection error (RFC 9113 §5.4.1: GOAWAY, then close) and
:class:`StreamFrameError` a stream error (§5.4.2: RST_STREAM), each with its error code (§7).
"""

from __future__ import annotations

import struct
from typing import Protocol

# ---- RFC 9113 constants -----------------------------------------------------------------------
#: frame header: length (24 bits, read as 16 + 8), type, flags, R bit + stream id (§4.1)
HEADER = struct.Struct(">HBBBL")
HEADER_LEN = 9
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the client's connection preface (§3.4)

# frame types (§6)
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# flags
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8

# error codes (§7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
CANCEL = 0x8
CONNECT_ERROR = 0xA

DEFAULT_WINDOW = 65535  # initial stream and connection window (§6.9.2)
DEFAULT_MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE until the peer says otherwise (§6.5.2)
MAX_WINDOW = 2**31 - 1  # largest legal flow-control window (§6.9.1)
_STREAM_MASK = 0x7FFFFFFF
_EMPTY = memoryview(b"")


class FrameError(Exception):
    """A connection error (RFC 9113 §5.4.1): the connection ends with GOAWAY(``code``)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamFrameError(Exception):
    """A stream error (RFC 9113 §5.4.2): stream ``stream_id`` is reset with RST_STREAM(``code``)."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code


# ---- writing ----------------------------------------------------------------------------------
def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte header of a frame with a ``length``-byte payload."""
    return HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id)


def data_header(length: int, stream_id: int, end_stream: bool = False) -> bytes:
    """Header of a DATA frame (no padding) carrying ``length`` bytes."""
    return HEADER.pack(length >> 8, length & 0xFF, DATA, FLAG_END_STREAM if end_stream else 0, stream_id)


def window_update(stream_id: int, increment: int) -> bytes:
    """WINDOW_UPDATE: ``increment`` more bytes may be sent on the stream (0: the connection)."""
    if not 0 < increment <= MAX_WINDOW:
        raise ValueError(f"window increment {increment} out of range")
    return HEADER.pack(0, 4, WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4, "big")


def ping(opaque: bytes, ack: bool = False) -> bytes:
    """PING with 8 bytes of opaque data (an ACK echoes the peer's)."""
    if len(opaque) != 8:
        raise ValueError("PING carries exactly 8 bytes")
    return HEADER.pack(0, 8, PING, FLAG_ACK if ack else 0, 0) + bytes(opaque)


def rst_stream(stream_id: int, code: int) -> bytes:
    return HEADER.pack(0, 4, RST_STREAM, 0, stream_id) + code.to_bytes(4, "big")


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    n = 8 + len(debug)
    return HEADER.pack(n >> 8, n & 0xFF, GOAWAY, 0, 0) + last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big") + debug


# ---- reading the payloads of the frames handled here -------------------------------------------
def parse_window_update(payload: bytes, stream_id: int) -> int:
    """The increment of a WINDOW_UPDATE (§6.9); a zero increment is an error of its stream."""
    if len(payload) != 4:
        raise FrameError(FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes")
    inc = int.from_bytes(payload, "big") & _STREAM_MASK
    if inc == 0:
        if stream_id == 0:
            raise FrameError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
        raise StreamFrameError(stream_id, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
    return inc


def parse_ping(payload: bytes, stream_id: int) -> bytes:
    if stream_id != 0:
        raise FrameError(PROTOCOL_ERROR, f"PING on stream {stream_id}")
    if len(payload) != 8:
        raise FrameError(FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes")
    return payload


def parse_rst_stream(payload: bytes, stream_id: int) -> int:
    """The error code of a RST_STREAM (§6.4)."""
    if stream_id == 0:
        raise FrameError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
    if len(payload) != 4:
        raise FrameError(FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes")
    return int.from_bytes(payload, "big")


def parse_goaway(payload: bytes, stream_id: int) -> tuple[int, int]:
    """(last stream id, error code) of a GOAWAY (§6.8)."""
    if stream_id != 0:
        raise FrameError(PROTOCOL_ERROR, f"GOAWAY on stream {stream_id}")
    if len(payload) < 8:
        raise FrameError(FRAME_SIZE_ERROR, f"GOAWAY of {len(payload)} bytes")
    return int.from_bytes(payload[:4], "big") & _STREAM_MASK, int.from_bytes(payload[4:8], "big")


def unpad(payload: bytes, flags: int) -> memoryview:
    """The data of a DATA frame's payload, without its padding if it has any (§6.1)."""
    mv = memoryview(payload)
    if not flags & FLAG_PADDED:
        return mv
    if not mv or mv[0] >= len(mv):
        raise FrameError(PROTOCOL_ERROR, "padding as long as the frame")
    return mv[1 : len(mv) - mv[0]]


# ---- reading the byte stream ------------------------------------------------------------------
class FrameHandler(Protocol):
    """What :class:`FrameReader` hands frames to."""

    def on_data(self, stream_id: int, data: memoryview, end_stream: bool) -> None:
        """A piece of an unpadded DATA frame's payload; ``end_stream`` on the frame's last piece
        if the frame had END_STREAM. A frame with an empty payload is one empty piece."""

    def on_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        """Any other frame, whole (padded DATA too: see :func:`unpad`)."""


class FrameReader:
    """Cuts the byte stream after the connection preface into frames (RFC 9113 §4).

    Checks what belongs to framing itself: a frame larger than ``max_frame`` (FRAME_SIZE_ERROR),
    DATA on stream 0, and that a header block (HEADERS or PUSH_PROMISE without END_HEADERS) is
    followed by its CONTINUATION frames and nothing else (PROTOCOL_ERROR). Raises
    :class:`FrameError`; after one, the reader is unusable (the connection is over).
    """

    __slots__ = ("_handler", "max_frame", "_head", "_left", "_sid", "_end", "_body", "_blen", "_btype", "_bflags",
                 "_bsid", "_header_block")

    def __init__(self, handler: FrameHandler, max_frame: int) -> None:
        self._handler: FrameHandler | None = handler
        self.max_frame = max_frame
        self._head = bytearray()  # a frame header split across two reads
        self._left = 0  # payload bytes of the current DATA frame still to come
        self._sid = 0
        self._end = False
        self._body: bytearray | None = None  # a non-DATA frame's payload, split across reads
        self._blen = self._btype = self._bflags = self._bsid = 0
        self._header_block = 0  # stream whose header block awaits CONTINUATION (0: none)

    def close(self) -> None:
        """Let go of the handler (the handler usually holds the reader: a reference cycle)."""
        self._handler = None

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream; complete frames and DATA pieces go to the handler."""
        h = self._handler
        if h is None:
            return
        n = len(data)
        pos = 0
        mv: memoryview | None = None
        while pos < n:
            left = self._left
            if left:  # inside a DATA payload: pass on what is here
                take = n - pos if n - pos < left else left
                self._left = left = left - take
                if mv is None:
                    mv = memoryview(data)
                h.on_data(self._sid, mv[pos : pos + take], self._end and not left)
                pos += take
                continue
            if self._body is not None:  # inside another frame: collect it
                body = self._body
                take = min(self._blen - len(body), n - pos)
                body += data[pos : pos + take]
                pos += take
                if len(body) < self._blen:
                    return
                self._body = None
                self._whole(self._btype, self._bflags, self._bsid, bytes(body))
                continue
            if self._head or n - pos < HEADER_LEN:  # a header split across reads
                take = min(HEADER_LEN - len(self._head), n - pos)
                self._head += data[pos : pos + take]
                pos += take
                if len(self._head) < HEADER_LEN:
                    return
                hi, lo, ftype, flags, sid = HEADER.unpack(self._head)
                self._head.clear()
            else:
                hi, lo, ftype, flags, sid = HEADER.unpack_from(data, pos)
                pos += HEADER_LEN
            length = hi << 8 | lo
            sid &= _STREAM_MASK
            if length > self.max_frame:
                raise FrameError(FRAME_SIZE_ERROR, f"frame of {length} bytes (type {ftype}), limit {self.max_frame}")
            if self._header_block and ftype != CONTINUATION:
                raise FrameError(PROTOCOL_ERROR, f"frame type {ftype} inside the header block of stream "
                                                 f"{self._header_block}")
            if ftype == DATA and not flags & FLAG_PADDED:
                if sid == 0:
                    raise FrameError(PROTOCOL_ERROR, "DATA on stream 0")
                end = bool(flags & FLAG_END_STREAM)
                if n - pos >= length:  # the whole payload is here (small frames: the usual case)
                    if mv is None:
                        mv = memoryview(data)
                    h.on_data(sid, mv[pos : pos + length] if length else _EMPTY, end)
                    pos += length
                else:
                    self._sid, self._end, self._left = sid, end, length
                continue
            if n - pos >= length:
                pos += length
                self._whole(ftype, flags, sid, data[pos - length : pos])
            else:
                self._body = bytearray(data[pos:])
                self._blen, self._btype, self._bflags, self._bsid = length, ftype, flags, sid
                return

    def _whole(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == DATA and sid == 0:
            raise FrameError(PROTOCOL_ERROR, "DATA on stream 0")
        if ftype == CONTINUATION:
            if sid == 0 or sid != self._header_block:
                raise FrameError(PROTOCOL_ERROR, f"CONTINUATION on stream {sid} outside a header block")
            if flags & FLAG_END_HEADERS:
                self._header_block = 0
        elif ftype in (HEADERS, PUSH_PROMISE) and not flags & FLAG_END_HEADERS:
            self._header_block = sid or -1  # stream 0: h2 reports the error
        h = self._handler
        if h is not None:
            h.on_frame(ftype, flags, sid, payload)
