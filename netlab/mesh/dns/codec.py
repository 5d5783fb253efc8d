"""The DNS messages the lab's two DNS servers read and write (RFC 1035 §4): one question in, a
response with A records, no data, or an error code out. Enough for a stub resolver (glibc,
curl's) asking for a Service's address; anything else gets FORMERR or NOTIMP.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

TYPE_A, TYPE_AAAA = 1, 28
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
QR, AA, RD, RA = 0x8000, 0x0400, 0x0100, 0x0080
OPCODE_MASK = 0x7800
HEADER = struct.Struct("!HHHHHH")
MAX_UDP = 512  # a response that would not fit is not produced: one A record per address is small


class DnsFormatError(ValueError):
    """Not a DNS query the servers can read."""


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str  # lower-case, without the trailing dot
    qtype: int
    qclass: int
    question: bytes  # the question section as received (echoed in the response)


def _read_name(data: bytes, i: int) -> tuple[str, int]:
    labels: list[str] = []
    while True:
        if i >= len(data):
            raise DnsFormatError("name runs past the message")
        n = data[i]
        if n & 0xC0:  # a compression pointer: not in a question a stub resolver sends
            raise DnsFormatError("compressed name in a question")
        i += 1
        if n == 0:
            return ".".join(labels).lower(), i
        label = data[i:i + n]
        if len(label) < n:
            raise DnsFormatError("label runs past the message")
        labels.append(label.decode("ascii", "replace"))
        i += n
        if sum(len(x) + 1 for x in labels) > 255:
            raise DnsFormatError("name longer than 255 bytes")


def parse_query(data: bytes) -> Query:
    """The one question of a query; :class:`DnsFormatError` for anything else."""
    if len(data) < HEADER.size:
        raise DnsFormatError("shorter than a header")
    qid, flags, qd, _an, _ns, _ar = HEADER.unpack_from(data)
    if flags & QR:
        raise DnsFormatError("a response, not a query")
    if qd != 1:
        raise DnsFormatError(f"{qd} questions (want 1)")
    name, i = _read_name(data, HEADER.size)
    if i + 4 > len(data):
        raise DnsFormatError("question without type and class")
    qtype, qclass = struct.unpack_from("!HH", data, i)
    return Query(qid, flags, name, qtype, qclass, data[HEADER.size:i + 4])


def _header(q: Query, rcode: int, answers: int) -> bytes:
    flags = QR | AA | (q.flags & (OPCODE_MASK | RD)) | RA | rcode
    return HEADER.pack(q.id, flags, 1, answers, 0, 0)


def response(q: Query, addresses: Sequence[str] = (), ttl: int = 30) -> bytes:
    """NOERROR with an A record per IPv4 address (the question's name, by pointer); no
    addresses, or a question other than A: NOERROR without data (NODATA)."""
    rrs = b""
    if q.qtype == TYPE_A and q.qclass == CLASS_IN:
        for a in addresses:
            rrs += struct.pack("!HHHIH", 0xC000 | HEADER.size, TYPE_A, CLASS_IN, ttl, 4)
            rrs += ipaddress.IPv4Address(a).packed
    n = len(rrs) // 16
    return _header(q, NOERROR, n) + q.question + rrs


def error(q: Query, rcode: int) -> bytes:
    """The question echoed with ``rcode`` (NXDOMAIN, SERVFAIL, ...)."""
    return _header(q, rcode, 0) + q.question


def error_for(data: bytes, rcode: int) -> bytes | None:
    """FORMERR & co for a message :func:`parse_query` refused, if it has a header to answer."""
    if len(data) < HEADER.size:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & QR:
        return None  # never answer a response
    return HEADER.pack(qid, QR | (flags & (OPCODE_MASK | RD)) | RA | rcode, 0, 0, 0, 0)


def make_query(qid: int, name: str, qtype: int = TYPE_A) -> bytes:
    """A query as a stub resolver sends it (for tests and the lab's own checks)."""
    body = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split(".")) + b"\0"
    return HEADER.pack(qid, RD, 1, 0, 0, 0) + body + struct.pack("!HH", qtype, CLASS_IN)


def parse_response(data: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A addresses) of a response (tests)."""
    qid, flags, qd, an, _ns, _ar = HEADER.unpack_from(data)
    i = HEADER.size
    for _ in range(qd):
        _, i = _read_name(data, i)
        i += 4
    out = []
    for _ in range(an):
        if data[i] & 0xC0:
            i += 2
        else:
            _, i = _read_name(data, i)
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", data, i)
        i += 10
        if rtype == TYPE_A and rdlen == 4:
            out.append(str(ipaddress.IPv4Address(data[i:i + 4])))
        i += rdlen
    return qid, flags & 0xF, out
