"""ZDS, the protocol istio-cni's node agent hands pod network namespaces to ztunnel with (inpod
reference §3.1): its messages, their protobuf wire form, and the unix ``SOCK_SEQPACKET`` socket
they travel on with the netns fd in ``SCM_RIGHTS``.

The schema is package ``istio.workload.zds`` of the pinned ztunnel 1.30.3. Facts carried over
(field numbers and types; no upstream file is in this repository), read from two stored versions
that agree on every field used here: ``istio/ztunnel@2d2ad048:proto/zds.proto`` and
``istio/istio@e33e7136:pkg/zdsapi/zds.proto`` (the latter adds ``WorkloadInfo.windows_namespace =
5``, an optional message ztunnel reads on Windows only; an older ``proto/zds.proto`` without
``ZdsHello``/``WorkloadInfo``, where ``AddWorkload.uid`` is field 2, is *not* 1.30.3's):

===================  =====  ==================  ==========================================
message              field  name                type
===================  =====  ==================  ==========================================
ZdsHello             1      version             enum Version (NOT_USED = 0, V1 = 1)
WorkloadInfo         1      name                string
WorkloadInfo         2      namespace           string
WorkloadInfo         3      service_account     string   (4 reserved: was trust_domain)
AddWorkload          1      uid                 string
AddWorkload          2      workload_info       WorkloadInfo
KeepWorkload         1      uid                 string
DelWorkload          2      uid                 string   (field 2, not 1)
SnapshotSent         -      (no fields)
Ack                  1      error               string   (empty = success)
WorkloadRequest      oneof  add = 1, del = 2, snapshot_sent = 3, keep = 5
WorkloadResponse     oneof  ack = 1
===================  =====  ==================  ==========================================

The exchange (ztunnel ``src/inpod/protocol.rs``, istio-cni ``ztunnelserver.go``): ztunnel connects
and sends ``ZdsHello{version: V1}``; the agent sends a snapshot (one ``add`` per pod with its netns
fd, or ``keep`` for a pod whose netns it cannot open), then ``snapshot_sent``; afterwards only
``add`` and ``del``. ztunnel answers every request with ``WorkloadResponse{ack}``. An ``add``
carries exactly one fd, any other message none (otherwise a protocol error).

The wire form is protobuf's, written here by hand (varints and length-delimited fields, proto3:
a field at its default value is left out, an unknown field is skipped), which is all these
messages need. :func:`fields` decodes any message field by field, for tests and for reading a
capture.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from netlab import istio

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # protobuf wire types (SGROUP/EGROUP are not used by proto3)

#: A ZDS message is one datagram; ztunnel's are small (a few hundred bytes at most).
MAX_MESSAGE = 64 * 1024


class ZdsError(ValueError):
    """A message that is not what the protocol allows (bad wire form, wrong fds, wrong order)."""


# ================================================================================================
# protobuf wire form
# ================================================================================================
def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # int64 in two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data):
            raise ZdsError("truncated varint")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7
        if shift > 63:
            raise ZdsError("varint longer than 10 bytes")


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, LEN) + _varint(len(payload)) + payload


def _str_field(field: int, s: str) -> bytes:
    return _len_field(field, s.encode()) if s else b""  # proto3: "" is not written


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field of one message, in wire order: a varint
    as int, a length-delimited field as its bytes (a string, or a message to decode further)."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ZdsError("field number 0")
        if wire == VARINT:
            v, i = _read_varint(data, i)
            yield field, wire, v
        elif wire == LEN:
            n, i = _read_varint(data, i)
            if i + n > len(data):
                raise ZdsError(f"field {field}: {n} bytes announced, {len(data) - i} left")
            yield field, wire, data[i:i + n]
            i += n
        elif wire in (I64, I32):
            n = 8 if wire == I64 else 4
            if i + n > len(data):
                raise ZdsError(f"field {field}: truncated fixed{n * 8}")
            yield field, wire, data[i:i + n]
            i += n
        else:
            raise ZdsError(f"field {field}: wire type {wire} is not used by proto3")


def _string(v: int | bytes, what: str) -> str:
    if not isinstance(v, bytes):
        raise ZdsError(f"{what}: a varint where a string belongs")
    try:
        return v.decode()
    except UnicodeDecodeError:
        raise ZdsError(f"{what}: not UTF-8") from None


def _message(v: int | bytes, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise ZdsError(f"{what}: a varint where a message belongs")
    return v


# ================================================================================================
# messages
# ================================================================================================
@dataclass(frozen=True)
class ZdsHello:
    version: int = istio.ZDS_VERSION_V1

    def encode(self) -> bytes:
        return _key(1, VARINT) + _varint(self.version) if self.version else b""

    @classmethod
    def decode(cls, data: bytes) -> ZdsHello:
        version = 0
        for f, w, v in fields(data):
            if f == 1:
                if w != VARINT or not isinstance(v, int):
                    raise ZdsError("ZdsHello.version: not a varint")
                version = v
        return cls(version)


@dataclass(frozen=True)
class WorkloadInfo:
    name: str = ""
    namespace: str = ""
    service_account: str = ""

    def encode(self) -> bytes:
        return _str_field(1, self.name) + _str_field(2, self.namespace) + _str_field(3, self.service_account)

    @classmethod
    def decode(cls, data: bytes) -> WorkloadInfo:
        got = {1: "", 2: "", 3: ""}
        for f, _w, v in fields(data):
            if f in got:
                got[f] = _string(v, f"WorkloadInfo field {f}")
        return cls(got[1], got[2], got[3])


@dataclass(frozen=True)
class AddWorkload:
    """Sent with exactly one fd: the pod's network namespace."""

    uid: str
    workload_info: WorkloadInfo | None = None

    def encode(self) -> bytes:
        info = _len_field(2, self.workload_info.encode()) if self.workload_info is not None else b""
        return _str_field(1, self.uid) + info


@dataclass(frozen=True)
class KeepWorkload:
    """Snapshot only: keep this pod if you have it (its netns could not be opened)."""

    uid: str

    def encode(self) -> bytes:
        return _str_field(1, self.uid)


@dataclass(frozen=True)
class DelWorkload:
    uid: str

    def encode(self) -> bytes:
        return _str_field(2, self.uid)  # DelWorkload.uid is field 2


@dataclass(frozen=True)
class SnapshotSent:
    def encode(self) -> bytes:
        return b""


Request = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent

#: WorkloadRequest's oneof ``payload``: field number of each alternative
_REQUEST_FIELD: dict[type, int] = {AddWorkload: 1, DelWorkload: 2, SnapshotSent: 3, KeepWorkload: 5}


def encode_request(payload: Request) -> bytes:
    """A ``WorkloadRequest`` with ``payload`` set (an empty message is still written: a oneof)."""
    return _len_field(_REQUEST_FIELD[type(payload)], payload.encode())


def decode_request(data: bytes) -> Request:
    """The payload of a ``WorkloadRequest``; ZdsError if it has none (or garbage)."""
    payload: Request | None = None
    for f, _w, v in fields(data):  # a oneof: the last alternative on the wire wins
        if f == 1:
            uid, info = "", None
            for f2, _w2, v2 in fields(_message(v, "add")):
                if f2 == 1:
                    uid = _string(v2, "AddWorkload.uid")
                elif f2 == 2:
                    info = WorkloadInfo.decode(_message(v2, "AddWorkload.workload_info"))
            payload = AddWorkload(uid, info)
        elif f == 2:
            payload = DelWorkload(next((_string(v2, "DelWorkload.uid") for f2, _w2, v2 in fields(_message(v, "del"))
                                        if f2 == 2), ""))
        elif f == 3:
            _message(v, "snapshot_sent")
            payload = SnapshotSent()
        elif f == 5:
            payload = KeepWorkload(next((_string(v2, "KeepWorkload.uid") for f2, _w2, v2 in fields(_message(v, "keep"))
                                         if f2 == 1), ""))
    if payload is None:
        raise ZdsError("WorkloadRequest without a payload")
    return payload


@dataclass(frozen=True)
class Ack:
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def encode_response(ack: Ack) -> bytes:
    """``WorkloadResponse{ack: Ack{error}}``."""
    return _len_field(1, _str_field(1, ack.error))


def decode_response(data: bytes) -> Ack:
    for f, _w, v in fields(data):
        if f == 1:
            err = next((_string(v2, "Ack.error") for f2, _w2, v2 in fields(_message(v, "ack")) if f2 == 1), "")
            return Ack(err)
    raise ZdsError("WorkloadResponse without an ack")


def describe(payload: Request) -> str:
    """One line for logs: ``add <uid> (ns/name)``, ``del <uid>``, ..."""
    if isinstance(payload, AddWorkload):
        info = payload.workload_info
        return f"add {payload.uid}" + (f" ({info.namespace}/{info.name})" if info else "")
    if isinstance(payload, KeepWorkload):
        return f"keep {payload.uid}"
    if isinstance(payload, DelWorkload):
        return f"del {payload.uid}"
    return "snapshot_sent"


# ================================================================================================
# the socket: SOCK_SEQPACKET, one message per datagram, fds in SCM_RIGHTS
# ================================================================================================
class ZdsSocket:
    """One end of a connected unix ``SOCK_SEQPACKET`` socket, for asyncio: :meth:`send` a message
    (with fds), :meth:`recv` one (with the fds that came along; the caller owns them)."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("ZDS runs over SOCK_SEQPACKET")
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, path: str) -> ZdsSocket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, path)
        except BaseException:
            s.close()
            raise
        return cls(s)

    async def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        while True:
            try:
                self.sock.sendmsg([data], anc)
                return
            except BlockingIOError:
                await self._wait(writable=True)

    async def recv(self) -> tuple[bytes, list[int]]:
        """One message and its fds; ``b""`` with no fds when the peer closed the connection."""
        fd_room = socket.CMSG_SPACE(4 * array.array("i").itemsize)
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(MAX_MESSAGE, fd_room)
                break
            except BlockingIOError:
                await self._wait(writable=False)
        fds: list[int] = []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                fds += list(a)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise ZdsError("message or its fds truncated")
        return data, fds

    async def _wait(self, writable: bool) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()
        add, remove = ((self._loop.add_writer, self._loop.remove_writer) if writable
                       else (self._loop.add_reader, self._loop.remove_reader))
        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add(fd, ready)
        try:
            await fut
        finally:
            remove(fd)

    def close(self) -> None:
        self.sock.close()


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
