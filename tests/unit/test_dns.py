"""The lab's DNS (netlab/mesh/dns): the wire form, the names ztunnel and kube-dns answer, and both
servers on loopback (UDP and TCP)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from netlab.mesh.dns import codec
from netlab.mesh.dns.names import ServiceNames
from netlab.mesh.dns.server import DnsServer, forward
from netlab.mesh.kubedns import KubeDns
from netlab.mesh.registry import build_registry
from netlab.plan.build import build_plan
from netlab.topology.load import load_topology

REG = build_registry(build_plan(load_topology("sidecar-to-ambient"), datapath="inpod"))
HTTPBIN = REG.by_hostname("httpbin.bar-1.svc.cluster.local")


def test_query_and_response_wire_form() -> None:
    q = codec.make_query(0x1234, "httpbin.bar-1.svc.cluster.local")
    # header: id, RD, 1 question; then the name as labels, type A, class IN
    assert q[:12] == bytes.fromhex("1234 0100 0001 0000 0000 0000")
    assert q[12:] == b"\x07httpbin\x05bar-1\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01"
    parsed = codec.parse_query(q)
    assert (parsed.id, parsed.name, parsed.qtype) == (0x1234, "httpbin.bar-1.svc.cluster.local", codec.TYPE_A)
    r = codec.response(parsed, ["10.96.0.10"])
    # QR|AA|RD|RA, NOERROR, 1 question, 1 answer; the answer points at the question's name (0xc00c)
    assert r[:12] == bytes.fromhex("1234 8580 0001 0001 0000 0000")
    assert r[-16:] == bytes.fromhex("c00c 0001 0001 0000001e 0004 0a60000a")
    assert codec.parse_response(r) == (0x1234, codec.NOERROR, ["10.96.0.10"])
    aaaa = codec.parse_query(codec.make_query(7, "httpbin.bar-1.svc.cluster.local", codec.TYPE_AAAA))
    assert codec.parse_response(codec.response(aaaa, ["10.96.0.10"])) == (7, codec.NOERROR, [])  # NODATA
    assert codec.parse_response(codec.error(parsed, codec.NXDOMAIN))[1] == codec.NXDOMAIN


@pytest.mark.parametrize("bad", [b"", b"\x00" * 11, bytes.fromhex("1234 8000 0001 0000 0000 0000") + b"\0\0\1\0\1",
                                 bytes.fromhex("1234 0100 0002 0000 0000 0000") + b"\0\0\1\0\1",
                                 bytes.fromhex("1234 0100 0001 0000 0000 0000") + b"\x05ab"])
def test_garbage_is_refused(bad: bytes) -> None:
    with pytest.raises(codec.DnsFormatError):
        codec.parse_query(bad)


def test_names_kube_dns_exact_ztunnel_aliases() -> None:
    n = ServiceNames(REG)
    vip = [HTTPBIN.vip] if HTTPBIN else []
    assert n.exact("httpbin.bar-1.svc.cluster.local") == vip
    assert n.exact("httpbin.bar-1") is None  # kube-dns: the client walks its search list
    for name in ("httpbin.bar-1.svc.cluster.local", "httpbin.bar-1.svc", "httpbin.bar-1",
                 "httpbin.bar-1.foo.svc.cluster.local", "HTTPBIN.bar-1."):
        assert n.for_pod(name, "foo") == vip, name  # ztunnel: aliases, the pod's search domains stripped
    assert n.for_pod("httpbin", "bar-1") == vip and n.for_pod("httpbin", "foo") is None
    assert n.for_pod("example.com", "foo") is None


def test_kube_dns_and_forward_on_loopback() -> None:
    async def run() -> None:
        kd = KubeDns(ServiceNames(REG), port=0)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        tcp.listen()
        server = await DnsServer(kd.resolve).start(udp, tcp)
        up = ("127.0.0.1", udp.getsockname()[1])
        try:
            got = await forward(codec.make_query(1, "httpbin.bar-1.svc.cluster.local"), up)
            assert got is not None and codec.parse_response(got) == (1, codec.NOERROR, [HTTPBIN.vip if HTTPBIN else ""])
            got = await forward(codec.make_query(2, "nope.bar-1.svc.cluster.local"), up)
            assert got is not None and codec.parse_response(got)[1] == codec.NXDOMAIN
            got = await forward(codec.make_query(3, "example.com"), up)
            assert got is not None and codec.parse_response(got)[1] == codec.SERVFAIL
            r, w = await asyncio.open_connection(*up)  # TCP, two-byte length
            q = codec.make_query(4, "helloworld.bar-2.svc.cluster.local")
            w.write(struct.pack("!H", len(q)) + q)
            n = struct.unpack("!H", await r.readexactly(2))[0]
            assert codec.parse_response(await r.readexactly(n))[2] == [REG.by_hostname("helloworld.bar-2.svc.cluster.local").vip]  # type: ignore[union-attr]
            w.close()
        finally:
            await server.close()

    asyncio.run(run())
