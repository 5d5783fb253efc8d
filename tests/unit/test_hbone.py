"""HBONE client/server on loopback (no root): mTLS 1.3 + h2 CONNECT, statuses, half-close, resets.

The server listens on 127.0.0.2 so "the connection's local IP" (the original destination under
TPROXY) is meaningful; upstream apps listen on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from netlab.istio import spiffe_id
from netlab.mesh.ca import LabCA
from netlab.mesh.hbone import (
    ConnectRequest,
    HboneError,
    HboneServer,
    HboneTlsError,
    baggage_header,
    forwarded_header,
    hbone_connect,
    new_traceparent,
    parse_authority,
    parse_baggage,
    parse_forwarded_for,
)
from netlab.mesh.relay import StreamReset, relay, tcp_connect, tcp_stream_from_socket

SERVER_IP = "127.0.0.2"
SERVER_ID = spiffe_id("srv", "server")
CLIENT_ID = spiffe_id("cli", "client")
DEFAULT_ID = spiffe_id("istio-system", "ztunnel")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = LabCA.create(d / "lab")
    evil = LabCA.create(d / "evil", trust_domain="evil.local", common_name="evil CA")
    return {
        "ca": ca.ca_cert_path,
        "evil_ca": evil.ca_cert_path,
        "server": ca.issue(SERVER_ID),
        "client": ca.issue(CLIENT_ID),
        "default": ca.issue(DEFAULT_ID),
        "foreign_td": ca.issue("spiffe://evil.local/ns/cli/sa/client", strict=False),  # trusted root
        "evil_client": evil.issue("spiffe://evil.local/ns/cli/sa/client"),
    }


def run(coro, timeout: float = 10.0):
    async def main():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


class Upstream:
    """App server on 127.0.0.1: reads to EOF, then replies sha256(request) + ``reply_size`` bytes."""

    def __init__(self, reply: bytes = b"", mode: str = "normal"):
        self.reply = reply
        self.mode = mode
        self.got: list[bytes] = []
        self.errors: list[BaseException] = []
        self.eof_seen = asyncio.Event()

    async def start(self):
        self.srv = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.addr = self.srv.sockets[0].getsockname()
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter):
        buf = bytearray()
        try:
            if self.mode == "reset_after_some":
                w.write(b"x" * 100_000)
                await w.drain()
                await asyncio.sleep(0.05)
                w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                w.transport.abort()
                return
            while d := await r.read(1 << 20):
                buf += d
            self.eof_seen.set()
            w.write(hashlib.sha256(buf).digest() + self.reply)
            await w.drain()
            w.close()
        except BaseException as e:  # noqa: BLE001 - recorded for the test to assert on
            self.errors.append(e)
        finally:
            self.got.append(bytes(buf))

    async def close(self):
        self.srv.close()


async def start_server(pki, upstream_addr=None, handler=None, cert_for=None, **kw) -> HboneServer:
    async def default_handler(req: ConnectRequest):
        return await tcp_connect(upstream_addr)

    srv = HboneServer(
        handler=handler or default_handler,
        cert_for=cert_for or (lambda ip: pki["server"] if ip == SERVER_IP else None),
        default_cert=pki["default"],
        ca=kw.pop("ca", pki["ca"]),
        **kw,
    )
    return await srv.start(host=SERVER_IP, port=0)


async def connect(pki, srv, authority=None, *, pair=None, expected=SERVER_ID, **kw):
    cert, key = pair or pki["client"]
    return await hbone_connect(
        srv.sockname, authority or f"{SERVER_IP}:8080", client_cert=cert, client_key=key,
        ca=kw.pop("ca", pki["ca"]), expected_identity=expected, timeout=5, **kw,
    )


# ---------------------------------------------------------------------------------------------
def test_bytes_flow_both_ways_with_half_close_and_headers(pki):
    payload = os.urandom(6 * 1024 * 1024 + 123)
    reply = os.urandom(3 * 1024 * 1024 + 7)

    async def main():
        up = await Upstream(reply).start()
        seen: list[ConnectRequest] = []
        results = []

        async def handler(req):
            seen.append(req)
            return await tcp_connect(up.addr)

        srv = await start_server(pki, handler=handler, on_relay_done=lambda r, res: results.append(res))
        tp = new_traceparent()
        s = await connect(pki, srv, headers={
            "baggage": baggage_header(namespace="cli", workload_name="sleep"),
            "forwarded": forwarded_header("10.1.2.3"),
            "traceparent": tp,
        })
        assert s.status == 200 and s.peer_identity == SERVER_ID
        for i in range(0, len(payload), 1 << 20):
            s.write(payload[i:i + (1 << 20)])
            await s.drain()
        s.write_eof()  # half-close: upstream must see EOF and still be able to answer
        await asyncio.wait_for(up.eof_seen.wait(), 5)
        got = await s.read_all()
        assert got[:32] == hashlib.sha256(payload).digest()
        assert got[32:] == reply
        await s.wait_closed()
        assert s.reset_exc is None
        for _ in range(100):
            if results:
                break
            await asyncio.sleep(0.01)
        assert up.got == [payload]
        req = seen[0]
        assert req.dest == (SERVER_IP, 8080) and req.peer_identity == CLIENT_ID
        assert req.local_addr[0] == SERVER_IP and req.peer_addr[0] == "127.0.0.1"
        assert req.baggage["k8s.namespace.name"] == "cli" and req.baggage["k8s.deployment.name"] == "sleep"
        assert req.forwarded_for == "10.1.2.3" and req.traceparent == tp
        assert results[0].bytes_up == len(payload) and results[0].bytes_down == 32 + len(reply)
        assert results[0].outcome == "ok"
        await srv.close()
        await up.close()

    run(main(), 15)


@pytest.mark.parametrize(
    "authority,expected",
    [("127.0.0.9:8080", 400), ("not-an-ip:80", 400), ("127.0.0.2", 400)],
)
def test_authority_checks(pki, authority, expected):
    async def main():
        srv = await start_server(pki, handler=lambda req: _never())
        with pytest.raises(HboneError) as ei:
            await connect(pki, srv, authority)
        assert ei.value.status == expected
        await srv.close()

    run(main())


async def _never():
    raise AssertionError("handler must not be called")


def test_waypoint_mode_accepts_any_authority(pki):
    async def main():
        up = await Upstream().start()
        seen = []

        async def handler(req):
            seen.append(req.authority)
            return await tcp_connect(up.addr)

        srv = await start_server(pki, handler=handler, check_authority=False)
        s = await connect(pki, srv, "10.96.0.10:80")
        s.write_eof()
        assert len(await s.read_all()) == 32
        assert seen == ["10.96.0.10:80"]
        await srv.close()
        await up.close()

    run(main())


def test_unknown_destination_gets_404_with_default_cert(pki):
    async def main():
        srv = await start_server(pki, handler=lambda req: _never(), cert_for=lambda ip: None)
        with pytest.raises(HboneError) as ei:
            await connect(pki, srv, expected=DEFAULT_ID)
        assert ei.value.status == 404
        await srv.close()

    run(main())


def test_non_connect_method_404(pki):
    async def main():
        srv = await start_server(pki, handler=lambda req: _never())
        with pytest.raises(HboneError) as ei:
            await connect(pki, srv, method="GET")
        assert ei.value.status == 404
        await srv.close()

    run(main())


@pytest.mark.parametrize("status", [401, 503])
def test_handler_status_is_returned(pki, status):
    async def main():
        async def handler(req):
            return status

        srv = await start_server(pki, handler=handler)
        with pytest.raises(HboneError) as ei:
            await connect(pki, srv)
        assert ei.value.status == status and type(ei.value) is HboneError
        await srv.close()

    run(main())


def test_upstream_connect_refused_is_503(pki):
    async def main():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
        s.close()  # nothing listens here any more
        srv = await start_server(pki, upstream_addr=dead)
        with pytest.raises(HboneError) as ei:
            await connect(pki, srv)
        assert ei.value.status == 503
        await srv.close()

    run(main())


def test_server_identity_mismatch_client_raises(pki):
    async def main():
        srv = await start_server(pki, handler=lambda req: _never())
        with pytest.raises(HboneTlsError, match="server identity"):
            await connect(pki, srv, expected=spiffe_id("srv", "someone-else"))
        await srv.close()

    run(main())


@pytest.mark.parametrize("which", ["foreign_td", "evil_client"])
def test_client_cert_of_other_trust_domain_rejected(pki, which):
    """Both a foreign-trust-domain cert from a trusted root and one from a trusted foreign root."""

    async def main():
        srv = await start_server(pki, handler=lambda req: _never(), ca=[pki["ca"], pki["evil_ca"]])
        with pytest.raises(HboneTlsError):
            await connect(pki, srv, pair=pki[which])
        assert srv.stats["tls_rejected"] == 1 and srv.stats["connections"] == 0
        await srv.close()

    run(main())


def test_client_cert_from_untrusted_ca_fails_handshake(pki):
    async def main():
        srv = await start_server(pki, handler=lambda req: _never())
        with pytest.raises(HboneTlsError):
            await connect(pki, srv, pair=pki["evil_client"])
        await _wait_stat(srv, "tls_failed")
        await srv.close()

    run(main())


async def _wait_stat(srv, key):
    for _ in range(200):
        if srv.stats[key]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} not counted: {dict(srv.stats)}")


def _raw_client_ctx(pki, *, cert=True, tls12=False, alpn=("h2",)):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki["ca"])
    if cert:
        ctx.load_cert_chain(*pki["client"])
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(alpn))
    return ctx


async def _raw_attempt(srv, ctx) -> bytes:
    """Handshake, then send the h2 preface; returns what the server answered (b"" = dropped)."""
    r, w = await asyncio.open_connection(*srv.sockname, ssl=ctx, server_hostname=None)
    w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
    return await asyncio.wait_for(r.read(100), 5)


@pytest.mark.parametrize("kind", ["no_client_cert", "tls12_only", "alpn_http11"])
def test_bad_tls_clients_are_refused(pki, kind):
    async def main():
        srv = await start_server(pki, handler=lambda req: _never())
        ctx = _raw_client_ctx(
            pki, cert=kind != "no_client_cert", tls12=kind == "tls12_only",
            alpn=("http/1.1",) if kind == "alpn_http11" else ("h2",),
        )
        try:
            answer = await _raw_attempt(srv, ctx)
        except (ssl.SSLError, ConnectionError):
            answer = b""
        assert answer == b""  # never an HTTP/2 SETTINGS frame
        await _wait_stat(srv, "tls_rejected" if kind == "alpn_http11" else "tls_failed")
        assert srv.stats["connections"] == 0
        await srv.close()

    run(main())


def test_good_raw_client_gets_settings(pki):
    """Control for the refusals above: the same raw client with valid parameters gets SETTINGS."""

    async def main():
        srv = await start_server(pki, handler=lambda req: _never())
        answer = await _raw_attempt(srv, _raw_client_ctx(pki))
        assert answer[3] == 0x4  # frame type SETTINGS
        await srv.close()

    run(main())


def test_a_client_that_never_sends_the_http2_preface_is_reset_at_the_deadline(pki):
    """mTLS done, then silence: cut at the handshake-and-preface deadline (issue 17, 12a), not held
    forever. A client that sent its preface in time keeps its stream past that deadline."""

    async def main():
        up = await Upstream(b"late").start()
        srv = await start_server(pki, upstream_addr=up.addr, handshake_timeout=0.5)
        r, w = await asyncio.open_connection(*srv.sockname, ssl=_raw_client_ctx(pki), server_hostname=None)
        t0 = asyncio.get_running_loop().time()
        got = b""
        try:
            while chunk := await asyncio.wait_for(r.read(1000), 3):  # the server's SETTINGS, then the end
                got += chunk
        except ConnectionError:
            pass
        took = asyncio.get_running_loop().time() - t0
        assert got[3] == 0x4 and 0.3 < took < 1.5, f"closed after {took:.2f} s"
        assert srv.stats["preface_timeout"] == 1 and srv.stats["connections"] == 0
        w.close()

        s = await connect(pki, srv)  # in time: the deadline no longer applies to this connection
        await asyncio.sleep(1.0)
        s.write(b"still here")
        s.write_eof()
        assert (await s.read_all())[32:] == b"late"
        assert up.got[-1] == b"still here" and srv.stats["preface_timeout"] == 1
        await srv.close()
        await up.close()

    run(main(), 15)


def test_upstream_reset_becomes_client_reset(pki):
    async def main():
        up = await Upstream(mode="reset_after_some").start()
        results = []
        srv = await start_server(pki, upstream_addr=up.addr, on_relay_done=lambda r, res: results.append(res))
        s = await connect(pki, srv)
        got = bytearray()
        with pytest.raises(StreamReset):
            while d := await s.read():
                got += d
        for _ in range(100):
            if results:
                break
            await asyncio.sleep(0.01)
        assert results and results[0].outcome == "upstream_reset"
        await srv.close()
        await up.close()

    run(main())


def test_client_abort_resets_upstream_tcp(pki):
    async def main():
        up = await Upstream().start()
        srv = await start_server(pki, upstream_addr=up.addr)
        s = await connect(pki, srv)
        s.write(b"partial request")
        await s.drain()
        await asyncio.sleep(0.1)
        s.abort()  # RST_STREAM -> upstream must see a TCP reset, not a clean EOF
        for _ in range(200):
            if up.errors or up.got:
                break
            await asyncio.sleep(0.01)
        assert up.errors and isinstance(up.errors[0], ConnectionResetError)
        assert not up.eof_seen.is_set()
        await srv.close()
        await up.close()

    run(main())


def test_a_client_gone_before_the_relay_is_still_reported(pki):
    """The handler accepted a CONNECT whose client gave up while it connected upstream: the
    upstream is aborted and ``on_relay_done`` still reports the stream (``downstream_gone``), so
    every accepted leg gets its log line, in ztunnel as in the sidecar and the waypoint."""

    async def main():
        up = await Upstream().start()
        results, release = [], asyncio.Event()

        async def slow_handler(req):
            await release.wait()  # the client times out meanwhile
            return await tcp_connect(up.addr)

        srv = await start_server(pki, handler=slow_handler, on_relay_done=lambda r, res: results.append(res))
        with pytest.raises(HboneError):
            await connect(pki, srv, tls_timeout=1.0)
        release.set()
        for _ in range(200):
            if results:
                break
            await asyncio.sleep(0.01)
        assert [(r.outcome, r.bytes_up, r.bytes_down) for r in results] == [("downstream_gone", 0, 0)]
        await srv.close()
        await up.close()

    run(main())


def test_importing_hbone_patches_neither_h2_nor_hyperframe():
    """HBONE's cheap frame repr is its own frame class, not a change to the libraries: importing
    netlab.mesh.hbone leaves every function and class attribute of h2 and hyperframe as it was."""
    code = (
        "import h2.connection as c, hyperframe.frame as f\n"
        "snap = lambda: (dict(vars(f)), {k: dict(vars(v)) for k, v in vars(f).items() if isinstance(v, type)},"
        " dict(vars(c.H2Connection)))\n"
        "before = snap()\n"
        "import netlab.mesh.hbone\n"
        "assert snap() == before, 'h2/hyperframe changed by importing netlab.mesh.hbone'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_relay_tcp_to_hbone_counts_and_half_close(pki):
    """A ztunnel-outbound-like leg: plain TCP client -> relay -> HBONE -> upstream."""
    payload = os.urandom(2 * 1024 * 1024)

    async def main():
        up = await Upstream(b"pong").start()
        srv = await start_server(pki, upstream_addr=up.addr)
        legs = []

        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        loop = asyncio.get_running_loop()

        async def proxy():
            sock, _ = await loop.sock_accept(lsock)
            from netlab.mesh.relay import tcp_stream_from_socket

            down = await tcp_stream_from_socket(sock)
            hb = await connect(pki, srv)
            legs.append(await relay(down, hb))

        task = asyncio.ensure_future(proxy())
        r, w = await asyncio.open_connection(*lsock.getsockname())
        w.write(payload)
        w.write_eof()
        answer = await r.read()
        await task
        assert answer == hashlib.sha256(payload).digest() + b"pong"
        assert tuple(legs[0]) == (len(payload), 36, "ok")
        w.close()
        lsock.close()
        await srv.close()
        await up.close()

    run(main())


def test_header_helpers():
    b = baggage_header(namespace="foo", workload_name="sleep", service_version="v1")
    assert b == (
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=foo,k8s.deployment.name=sleep,"
        "service.name=sleep,service.version=v1"
    )
    assert parse_baggage(b)["service.version"] == "v1"
    assert forwarded_header("10.0.0.1") == "for=10.0.0.1"
    assert forwarded_header("fd00::1") == 'for="[fd00::1]"'
    assert parse_forwarded_for('for="[fd00::1]"') == "fd00::1"
    assert parse_forwarded_for("for=10.0.0.1;proto=https") == "10.0.0.1"
    assert parse_forwarded_for("by=1.2.3.4") is None
    tp = new_traceparent()
    parts = tp.split("-")
    assert [len(p) for p in parts] == [2, 32, 16, 2] and parts[0] == "00" and parts[3] == "00"
    assert parse_authority("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_authority("[fd00::1]:80") == ("fd00::1", 80)
    assert parse_authority("example.com:80") is None and parse_authority("10.0.0.1:99999") is None


def test_server_handles_several_streams_on_one_connection(pki):
    """ztunnel 1.18 clients send one CONNECT per connection, but the server must not care."""
    from netlab.mesh.hbone.client import _open_stream

    async def main():
        up = await Upstream(b"!").start()
        srv = await start_server(pki, upstream_addr=up.addr)
        s1 = await connect(pki, srv)
        s2 = await _open_stream(s1._conn, f"{SERVER_IP}:8080", None, 5)
        assert s2.stream_id != s1.stream_id
        for s, msg in ((s2, b"two"), (s1, b"one")):
            s.write(msg)
            s.write_eof()
        assert await s1.read_all() == hashlib.sha256(b"one").digest() + b"!"
        assert await s2.read_all() == hashlib.sha256(b"two").digest() + b"!"
        assert srv.stats["connections"] == 1 and srv.stats["200"] == 2
        await srv.close()
        await up.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# An HBONE peer that dies mid-stream is a reset downstream, never a clean end (FIN / END_STREAM).
# The server runs in a child process that gets SIGKILL: its kernel closes the TLS connection with
# a FIN when the dead process had read everything (the case a relay could mistake for a
# half-close), or with a RST when bytes were still unread ("stalled": SIGSTOP first).
# ---------------------------------------------------------------------------------------------
_KILLED_SERVER = r"""
import asyncio, hashlib, json, os, sys
from netlab.mesh.hbone import HboneServer
from netlab.mesh.process import install_fast_loop
from netlab.mesh.relay import tcp_connect

cert, key, ca = sys.argv[1:4]

async def main():
    async def sink(r, w):  # never answers before the client's EOF, which never comes
        try:
            while await r.read(1 << 16):
                pass
            w.write(b"digest\n")
            await w.drain()
        except ConnectionError:
            pass
        w.close()

    up = await asyncio.start_server(sink, "127.0.0.1", 0)
    upaddr = up.sockets[0].getsockname()

    async def handler(req):
        return await tcp_connect(upaddr)

    srv = await HboneServer(handler=handler, cert_for=lambda ip: (cert, key), default_cert=(cert, key), ca=ca,
                            check_authority=False).start(host="127.0.0.2", port=0)
    print(json.dumps({"port": srv.sockname[1]}), flush=True)
    await asyncio.Event().wait()

if sys.argv[4] == "uvloop":
    install_fast_loop()
asyncio.run(main())
"""

LOOP_KINDS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
@pytest.mark.parametrize("how", ["drained", "stalled"])
def test_hbone_server_killed_mid_stream_is_a_reset_never_a_fin(pki, loop_kind, how):
    """12 TCP clients -> relay (a sidecar's outbound leg) -> HBONE -> server process, plus one
    pull-API HBONE client; SIGKILL the server mid-stream. Every TCP client must get a RST (not a
    FIN) and the HBONE client a reset (not b"")."""
    n = 12
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    cert, key = pki["server"]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SERVER, str(cert), str(key), str(pki["ca"]), loop_kind],
                             stdout=subprocess.PIPE, env=env)

    async def main():
        loop = asyncio.get_running_loop()
        port = json.loads(await loop.run_in_executor(None, child.stdout.readline))["port"]
        server = SimpleNamespace(sockname=("127.0.0.2", port))
        outcomes: list[str] = []
        relaying: list[object] = []

        async def sidecar_leg(sock):
            down = await tcp_stream_from_socket(sock)
            up = await connect(pki, server)
            relaying.append(up)
            outcomes.append((await relay(down, up)).outcome)

        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(64)
        lsock.setblocking(False)
        legs = []

        async def accept():
            while True:
                s, _ = await loop.sock_accept(lsock)
                legs.append(asyncio.ensure_future(sidecar_leg(s)))

        acceptor = asyncio.ensure_future(accept())
        chunk = os.urandom(64 * 1024)
        clients = []
        for _ in range(n):
            c = socket.socket()
            c.setblocking(False)
            await loop.sock_connect(c, lsock.getsockname())
            clients.append(c)
        direct = await connect(pki, server)
        for c in clients:  # mid-stream: some bytes sent, no FIN
            await loop.sock_sendall(c, chunk)
        direct.write(chunk)
        for _ in range(500):  # every leg is up and relaying
            if len(relaying) == n:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # "drained": the server has read it all, so its kernel will FIN
        if how == "stalled":
            child.send_signal(signal.SIGSTOP)
            for c in clients:  # sits unread in the stopped server's socket: its kernel will RST
                await loop.sock_sendall(c, chunk)
            direct.write(chunk)
            await asyncio.sleep(0.2)
        child.kill()

        async def ending(c):
            try:
                data = await asyncio.wait_for(loop.sock_recv(c, 65536), 10)
            except ConnectionResetError:
                return "reset"
            return "FIN (clean end, bytes missing)" if data == b"" else f"data {data[:20]!r}"

        ends = await asyncio.gather(*(ending(c) for c in clients))
        try:
            got = await asyncio.wait_for(direct.read(), 10)
            direct_end = "FIN (clean end, bytes missing)" if got == b"" else f"data {got[:20]!r}"
        except ConnectionError:
            direct_end = "reset"
        await asyncio.gather(*legs)
        acceptor.cancel()
        for c in clients:
            c.close()
        lsock.close()
        assert ends == ["reset"] * n, ends
        assert direct_end == "reset"
        assert outcomes == ["upstream_reset"] * n, outcomes

    try:
        loop = _new_loop(loop_kind)
        try:
            loop.run_until_complete(asyncio.wait_for(main(), 30))
        finally:
            loop.close()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
