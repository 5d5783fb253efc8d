"""The ZDS codec (netlab/mesh/zds.py) against the field numbers and types of the pinned
zds.proto, byte by byte (hand-assembled protobuf, not produced by the code under test), and the
SEQPACKET socket carrying an fd in SCM_RIGHTS."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import pytest

from netlab.mesh import zds

# Hand-assembled from the proto facts (key = field << 3 | wire type; 0 varint, 2 length-delimited)
HELLO_V1 = bytes([0x08, 0x01])  # ZdsHello{version(1, enum): V1 = 1}
INFO = bytes([0x0A, 0x01]) + b"n" + bytes([0x12, 0x01]) + b"s" + bytes([0x1A, 0x01]) + b"a"  # name 1, namespace 2, sa 3
ADD = bytes([0x0A, 0x01]) + b"u" + bytes([0x12, len(INFO)]) + INFO  # AddWorkload{uid 1, workload_info 2}
REQ_ADD = bytes([0x0A, len(ADD)]) + ADD  # WorkloadRequest{add = 1}
REQ_DEL = bytes([0x12, 0x03, 0x12, 0x01]) + b"u"  # WorkloadRequest{del = 2: DelWorkload{uid = 2}}
REQ_SNAP = bytes([0x1A, 0x00])  # WorkloadRequest{snapshot_sent = 3: {}}
REQ_KEEP = bytes([0x2A, 0x03, 0x0A, 0x01]) + b"u"  # WorkloadRequest{keep = 5: KeepWorkload{uid = 1}}
ACK_OK = bytes([0x0A, 0x00])  # WorkloadResponse{ack = 1: Ack{}}
ACK_ERR = bytes([0x0A, 0x05, 0x0A, 0x03]) + b"bad"  # Ack{error = 1}


def test_encodings_are_the_proto_bytes() -> None:
    assert zds.ZdsHello().encode() == HELLO_V1
    assert zds.encode_request(zds.AddWorkload("u", zds.WorkloadInfo("n", "s", "a"))) == REQ_ADD
    assert zds.encode_request(zds.DelWorkload("u")) == REQ_DEL
    assert zds.encode_request(zds.SnapshotSent()) == REQ_SNAP
    assert zds.encode_request(zds.KeepWorkload("u")) == REQ_KEEP
    assert zds.encode_response(zds.Ack()) == ACK_OK
    assert zds.encode_response(zds.Ack("bad")) == ACK_ERR


def test_decodings() -> None:
    assert zds.ZdsHello.decode(HELLO_V1).version == 1
    assert zds.decode_request(REQ_ADD) == zds.AddWorkload("u", zds.WorkloadInfo("n", "s", "a"))
    assert zds.decode_request(REQ_DEL) == zds.DelWorkload("u")
    assert zds.decode_request(REQ_SNAP) == zds.SnapshotSent()
    assert zds.decode_request(REQ_KEEP) == zds.KeepWorkload("u")
    assert zds.decode_response(ACK_OK) == zds.Ack("")
    assert zds.decode_response(ACK_ERR) == zds.Ack("bad")
    # unknown fields are skipped (a newer WorkloadInfo.windows_namespace = 5, say)
    assert zds.WorkloadInfo.decode(INFO + bytes([0x2A, 0x02, 0x08, 0x07])) == zds.WorkloadInfo("n", "s", "a")


def test_fields_decodes_field_by_field() -> None:
    assert list(zds.fields(REQ_ADD)) == [(1, zds.LEN, ADD)]
    assert list(zds.fields(ADD)) == [(1, zds.LEN, b"u"), (2, zds.LEN, INFO)]
    assert list(zds.fields(INFO)) == [(1, zds.LEN, b"n"), (2, zds.LEN, b"s"), (3, zds.LEN, b"a")]


@pytest.mark.parametrize("bad", [b"\x0a\x05ab", b"\x80", b"\x00\x01", b"", b"\x0b"])
def test_garbage_is_a_zds_error(bad: bytes) -> None:
    with pytest.raises(zds.ZdsError):
        zds.decode_request(bad)


def test_long_varint_and_multibyte_length() -> None:
    uid = "x" * 300  # KeepWorkload: 0a, varint 300 = ac 02, 300 bytes: 303 = varint af 02
    enc = zds.encode_request(zds.KeepWorkload(uid))
    assert enc[:4] == bytes([0x2A, 0xAF, 0x02, 0x0A]) and enc[4:6] == bytes([0xAC, 0x02])
    assert zds.decode_request(enc) == zds.KeepWorkload(uid)


def test_seqpacket_carries_the_fd() -> None:
    async def run() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sa, sb = zds.ZdsSocket(a), zds.ZdsSocket(b)
        with tempfile.TemporaryFile() as f:
            await sa.send(REQ_ADD, (f.fileno(),))
            await sa.send(REQ_SNAP)
            data, fds = await sb.recv()
            assert data == REQ_ADD and len(fds) == 1
            assert os.fstat(fds[0]).st_ino == os.fstat(f.fileno()).st_ino  # the same open file
            os.close(fds[0])
            assert await sb.recv() == (REQ_SNAP, [])  # one message per datagram, no fd
        sa.close()
        assert await sb.recv() == (b"", [])
        sb.close()

    asyncio.run(run())
