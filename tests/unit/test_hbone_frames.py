"""The HBONE framing layer (netlab.mesh.hbone.frames) against an HTTP/2 framing that is not ours.

hyperframe (the frame layer under the h2 library) builds the byte streams here and parses what
our writers build, so both directions are checked against an independent reading of RFC 9113.
The reader is fed every byte stream whole, byte by byte and cut at every offset, because TLS
records cut frames anywhere.
"""

from __future__ import annotations

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from netlab.mesh.hbone import frames
from netlab.mesh.hbone.frames import FrameError, FrameReader, StreamFrameError


class Recorder:
    """Collects what the reader hands on: DATA pieces joined per frame, other frames whole."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self._data: dict[int, bytearray] = {}

    def on_data(self, stream_id: int, data: memoryview, end_stream: bool) -> None:
        assert isinstance(data, memoryview)
        self._data.setdefault(stream_id, bytearray()).extend(data)
        if end_stream:
            self.events.append(("data", stream_id, bytes(self._data.pop(stream_id)), True))

    def on_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        self.events.append(("frame", ftype, flags, stream_id, bytes(payload)))

    def data(self, stream_id: int) -> bytes:
        return bytes(self._data.get(stream_id, b""))


def feed_in_pieces(stream: bytes, cuts: list[int], max_frame: int = 1 << 20) -> Recorder:
    rec = Recorder()
    reader = FrameReader(rec, max_frame)
    last = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(stream[last:cut])
        last = cut
    return rec


def tunnel_stream() -> tuple[bytes, bytes]:
    """A tunnel's frames as hyperframe writes them; the DATA bytes of stream 1 they carry."""
    body = bytes(range(256)) * 200  # 51200 bytes over several frames
    out: list[Frame] = [SettingsFrame(0, settings={4: 1 << 22})]
    h = HeadersFrame(1, data=b"\x82\x84", flags=["END_HEADERS"])
    out.append(h)
    for i in range(0, len(body), 20000):
        out.append(DataFrame(1, data=body[i : i + 20000]))
    out.append(WindowUpdateFrame(0, window_increment=12345))
    out.append(PingFrame(0, opaque_data=b"12345678"))
    out.append(DataFrame(3, data=b"", flags=["END_STREAM"]))
    out.append(RstStreamFrame(5, error_code=8))
    out.append(GoAwayFrame(0, last_stream_id=5, error_code=0, additional_data=b"bye"))
    return b"".join(f.serialize() for f in out), body


def check_tunnel(rec: Recorder, body: bytes) -> None:
    assert rec.data(1) == body
    kinds = [(e[0], e[1]) for e in rec.events]
    assert kinds == [("frame", frames.SETTINGS), ("frame", frames.HEADERS), ("frame", frames.WINDOW_UPDATE),
                     ("frame", frames.PING), ("data", 3), ("frame", frames.RST_STREAM), ("frame", frames.GOAWAY)]
    wu, ping, rst, goaway = rec.events[2], rec.events[3], rec.events[5], rec.events[6]
    assert frames.parse_window_update(wu[4], wu[3]) == 12345
    assert frames.parse_ping(ping[4], ping[3]) == b"12345678"
    assert frames.parse_rst_stream(rst[4], rst[3]) == 8
    assert frames.parse_goaway(goaway[4], goaway[3]) == (5, 0)
    assert rec.events[4] == ("data", 3, b"", True)


def test_reader_reads_hyperframes_whole_and_cut_anywhere():
    stream, body = tunnel_stream()
    check_tunnel(feed_in_pieces(stream, []), body)
    check_tunnel(feed_in_pieces(stream, list(range(1, len(stream)))), body)  # byte by byte
    for cut in range(1, 200):  # every cut inside the first frames' headers and payloads
        check_tunnel(feed_in_pieces(stream, [cut, cut + 7, cut + 16391]), body)


def test_writers_produce_what_hyperframe_parses():
    def parse(raw: bytes) -> Frame:
        f, length = Frame.parse_frame_header(memoryview(raw[:9]))
        assert length == len(raw) - 9
        f.parse_body(memoryview(raw[9:]))
        return f

    d = parse(frames.data_header(5, 7, end_stream=True) + b"hello")
    assert isinstance(d, DataFrame) and d.stream_id == 7 and d.data == b"hello" and "END_STREAM" in d.flags
    big = parse(frames.data_header(70000, 1) + b"x" * 70000)
    assert isinstance(big, DataFrame) and len(big.data) == 70000 and not big.flags
    w = parse(frames.window_update(3, 2**31 - 1))
    assert isinstance(w, WindowUpdateFrame) and w.stream_id == 3 and w.window_increment == 2**31 - 1
    p = parse(frames.ping(b"abcdefgh", ack=True))
    assert isinstance(p, PingFrame) and p.opaque_data == b"abcdefgh" and "ACK" in p.flags
    r = parse(frames.rst_stream(9, frames.CONNECT_ERROR))
    assert isinstance(r, RstStreamFrame) and r.stream_id == 9 and r.error_code == 0xA
    g = parse(frames.goaway(11, frames.PROTOCOL_ERROR, b"why"))
    assert isinstance(g, GoAwayFrame) and (g.last_stream_id, g.error_code, g.additional_data) == (11, 1, b"why")
    with pytest.raises(ValueError):
        frames.window_update(1, 0)


def test_padded_data_is_handed_whole_and_unpadded():
    raw = DataFrame(1, data=b"payload", pad_length=10, flags=["PADDED", "END_STREAM"]).serialize()
    rec = feed_in_pieces(raw, [3, 12])
    [(kind, ftype, flags, sid, payload)] = rec.events
    assert (kind, ftype, sid) == ("frame", frames.DATA, 1)
    assert bytes(frames.unpad(payload, flags)) == b"payload"
    with pytest.raises(FrameError) as e:
        frames.unpad(b"\x05abc", frames.FLAG_PADDED)
    assert e.value.code == frames.PROTOCOL_ERROR


def test_header_block_with_continuation_and_its_errors():
    ok = (HeadersFrame(1, data=b"ab").serialize() + ContinuationFrame(1, data=b"cd", flags=["END_HEADERS"]).serialize()
          + DataFrame(1, data=b"z", flags=["END_STREAM"]).serialize())
    rec = feed_in_pieces(ok, [10])
    assert [e[1] for e in rec.events[:2]] == [frames.HEADERS, frames.CONTINUATION]
    assert rec.events[2] == ("data", 1, b"z", True)
    # anything but CONTINUATION inside a header block is a connection error (RFC 9113 §6.10)
    bad = HeadersFrame(1, data=b"ab").serialize() + DataFrame(1, data=b"z").serialize()
    with pytest.raises(FrameError) as e:
        feed_in_pieces(bad, [])
    assert e.value.code == frames.PROTOCOL_ERROR
    stray = ContinuationFrame(1, data=b"cd", flags=["END_HEADERS"]).serialize()
    with pytest.raises(FrameError):
        feed_in_pieces(stray, [])


@pytest.mark.parametrize("raw, code", [
    (frames.data_header(20000, 1) + b"x" * 20000, frames.FRAME_SIZE_ERROR),  # above max_frame
    (frames.data_header(1, 0) + b"x", frames.PROTOCOL_ERROR),  # DATA on stream 0
])
def test_framing_errors_are_connection_errors(raw, code):
    with pytest.raises(FrameError) as e:
        feed_in_pieces(raw, [], max_frame=16384)
    assert e.value.code == code


def test_payload_checks_of_control_frames():
    with pytest.raises(StreamFrameError) as se:
        frames.parse_window_update(b"\0\0\0\0", 3)
    assert (se.value.stream_id, se.value.code) == (3, frames.PROTOCOL_ERROR)
    for call in (lambda: frames.parse_window_update(b"\0\0\0\0", 0), lambda: frames.parse_ping(b"12345678", 1),
                 lambda: frames.parse_rst_stream(b"\0\0\0\0", 0), lambda: frames.parse_goaway(b"\0" * 8, 1)):
        with pytest.raises(FrameError) as e:
            call()
        assert e.value.code == frames.PROTOCOL_ERROR
    for call in (lambda: frames.parse_window_update(b"\0\0\1", 1), lambda: frames.parse_ping(b"1234567", 0),
                 lambda: frames.parse_rst_stream(b"\0\0\0", 1), lambda: frames.parse_goaway(b"\0" * 7, 0)):
        with pytest.raises(FrameError) as e:
            call()
        assert e.value.code == frames.FRAME_SIZE_ERROR


def test_reader_after_close_hands_on_nothing():
    rec = Recorder()
    reader = FrameReader(rec, 1 << 20)
    reader.close()
    reader.feed(frames.ping(b"12345678"))
    assert rec.events == []
