"""Sidecar on loopback: the §5.2 endpoint choice, HBONE origination with baggage, inbound from 127.0.0.6."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from netlab import istio
from netlab.mesh.hbone import HboneServer, hbone_connect, parse_baggage
from netlab.mesh.relay import tcp_connect
from netlab.mesh.sidecar.base import TrustDomainSans
from netlab.mesh.sidecar.inbound import HboneInbound, Inbound
from netlab.mesh.sidecar.outbound import Outbound, route_outbound
from tests.unit.test_sidecar_support import (
    HELLO_IP,
    HELLO_VIP,
    HTTPBIN_VIP,
    NATIVE_IP,
    OTHER_IP,
    PLAIN_IP,
    SLEEP_IP,
    WAYPOINT_IP,
    conn_log,
    echo_server,
    fake_ztunnel,
    lab_registry,
    make_certs,
    wait_legs,
)

SLEEP_ID = istio.spiffe_id("foo", "sleep")


# ---- routing (pure) -------------------------------------------------------------------------------
def test_route_vip_with_waypoint_tunnels_to_waypoint_with_pod_authority() -> None:
    r = route_outbound(lab_registry(), (HELLO_VIP, 5000))
    assert r.kind == "hbone" and r.target == (WAYPOINT_IP, 15008)
    assert r.authority == f"{HELLO_IP}:5000"  # the endpoint, not the VIP (EDS rewrite)
    assert r.via_waypoint is not None and r.via_waypoint.ip == WAYPOINT_IP


def test_route_ambient_pod_without_waypoint_and_native_sidecar() -> None:
    reg = lab_registry()
    r = route_outbound(reg, (OTHER_IP, 9000))
    assert (r.kind, r.target, r.authority) == ("hbone", (OTHER_IP, 15008), f"{OTHER_IP}:9000")
    r = route_outbound(reg, (NATIVE_IP, 80))
    assert (r.kind, r.target, r.via_waypoint) == ("hbone", (NATIVE_IP, 15008), None)


def test_route_plain_sidecar_passthrough_and_empty_service() -> None:
    reg = lab_registry()
    r = route_outbound(reg, (HTTPBIN_VIP, 8000))
    assert (r.kind, r.target) == ("tcp", (PLAIN_IP, 80))  # servicePort -> targetPort
    assert route_outbound(reg, ("192.0.2.1", 443)).kind == "passthrough"
    assert route_outbound(reg, ("192.0.2.1", 443)).target == ("192.0.2.1", 443)
    r = route_outbound(reg, ("10.96.0.13", 80))
    assert (r.kind, r.target) == ("no_endpoint", None)


def test_trust_domain_sans() -> None:
    m = TrustDomainSans("cluster.local")
    assert "spiffe://cluster.local/ns/a/sa/b" in m
    assert "spiffe://other.local/ns/a/sa/b" not in m
    assert "spiffe://cluster.local/" not in m and list(m) == ["spiffe://cluster.local/*"]


# ---- outbound over loopback -----------------------------------------------------------------------
async def _client_and_accepted() -> tuple[socket.socket, socket.socket, socket.socket]:
    """A connected (client, accepted) pair on 127.0.0.5, as if REDIRECT had handed it to 15001."""
    ls = socket.socket()
    ls.bind((SLEEP_IP, 0))
    ls.listen()
    ls.setblocking(False)
    c = socket.socket()
    c.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(c, ls.getsockname())
    a, _ = await loop.sock_accept(ls)
    return c, a, ls


def test_outbound_hbone_via_waypoint_sends_baggage_and_pod_authority(tmp_path: Path) -> None:
    async def main() -> None:
        reg, certs = lab_registry(), make_certs(tmp_path)
        app, app_port, _ = await echo_server()
        wp = await fake_ztunnel(certs, reg, WAYPOINT_IP, app_port, check_authority=False)  # plays the waypoint
        clog, path = conn_log(tmp_path, "sleep.foo-sidecar")
        out = Outbound(reg=reg, me=reg.workloads[SLEEP_IP], cert=certs.pair(SLEEP_ID), ca=certs.ca_path,
                       conn_log=clog, component="sleep.foo-sidecar", hbone_port=wp.port)
        c, a, ls = await _client_and_accepted()
        loop = asyncio.get_running_loop()
        try:
            task = loop.create_task(out.serve(a, (HELLO_VIP, 5000)))
            await loop.sock_sendall(c, b"abc")
            c.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := await loop.sock_recv(c, 100):
                got += chunk
            await task
            assert got == b"abc"
            (req,) = wp.requests
            assert req.authority == f"{HELLO_IP}:5000" and req.peer_identity == SLEEP_ID
            bag = req.baggage
            assert bag["k8s.deployment.name"] == "sleep" and bag["k8s.namespace.name"] == "foo"
            (leg,) = await wait_legs(path)
            assert leg["proto"] == "hbone" and leg["up_dst"] == f"{WAYPOINT_IP}:{wp.port}"
            assert leg["dst_id"] == reg.workloads[WAYPOINT_IP].identity and leg["extra"]["waypoint"] == "bar-2/waypoint"
            assert (leg["bytes_up"], leg["bytes_down"], leg["outcome"]) == (3, 3, "ok")
        finally:
            c.close()
            ls.close()
            await wp.server.close()
            app.close()

    asyncio.run(main())


def test_outbound_refuses_server_outside_trust_domain(tmp_path: Path) -> None:
    async def main() -> None:
        reg, certs = lab_registry(), make_certs(tmp_path)
        app, app_port, _ = await echo_server()
        evil = certs.pair("spiffe://evil.local/ns/x/sa/y", strict=False)
        seen: list[object] = []

        async def handler(req):  # must never run: the TLS check fails first
            seen.append(req)
            return await tcp_connect(("127.0.0.1", app_port))

        srv = HboneServer(handler=handler, cert_for=lambda ip: evil, default_cert=evil, ca=certs.ca_path,
                          check_authority=False)
        s = socket.socket()
        s.bind((OTHER_IP, 0))
        await srv.start(sock=s)
        clog, path = conn_log(tmp_path, "sc")
        out = Outbound(reg=reg, me=reg.workloads[SLEEP_IP], cert=certs.pair(SLEEP_ID), ca=certs.ca_path,
                       conn_log=clog, component="sc", hbone_port=s.getsockname()[1])
        c, a, ls = await _client_and_accepted()
        try:
            await out.serve(a, (OTHER_IP, 9000))
            (leg,) = await wait_legs(path)
            assert leg["outcome"].startswith("error:") and "identity" in leg["outcome"]
            assert not seen
        finally:
            c.close()
            ls.close()
            await srv.close()
            app.close()

    asyncio.run(main())


# ---- inbound --------------------------------------------------------------------------------------
def test_inbound_reaches_app_from_127_0_0_6(tmp_path: Path) -> None:
    async def main() -> None:
        reg = lab_registry()
        app, app_port, peers = await echo_server(PLAIN_IP)
        clog, path = conn_log(tmp_path, "httpbin.bar-1-sidecar")
        inb = Inbound(me=reg.workloads[PLAIN_IP], conn_log=clog, component="httpbin.bar-1-sidecar")
        c, a, ls = await _client_and_accepted()
        loop = asyncio.get_running_loop()
        try:
            task = loop.create_task(inb.serve(a, (PLAIN_IP, app_port)))
            await loop.sock_sendall(c, b"xyz")
            c.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(c, 100) == b"xyz"
            await task
            assert peers[0][0] == "127.0.0.6"
            (leg,) = await wait_legs(path)
            assert leg["up_src"].startswith("127.0.0.6:") and leg["up_dst"] == f"{PLAIN_IP}:{app_port}"
        finally:
            c.close()
            ls.close()
            app.close()

    asyncio.run(main())


def test_native_hbone_inbound(tmp_path: Path) -> None:
    async def main() -> None:
        reg, certs = lab_registry(), make_certs(tmp_path)
        me = reg.workloads[NATIVE_IP]
        app, app_port, peers = await echo_server(NATIVE_IP)
        clog, path = conn_log(tmp_path, "native")
        hb = HboneInbound(reg=reg, me=me, cert=certs.pair(me.identity), ca=certs.ca_path, conn_log=clog,
                          component="native")
        s = socket.socket()
        s.bind((NATIVE_IP, 0))
        await hb.server.start(sock=s)
        try:
            c, k = certs.pair(SLEEP_ID)
            st = await hbone_connect(s.getsockname(), f"{NATIVE_IP}:{app_port}", client_cert=c, client_key=k,
                                     ca=certs.ca_path, expected_identity=me.identity)
            st.write(b"q")
            st.write_eof()
            assert await st.read_all() == b"q"
            assert peers[0][0] == "127.0.0.6"
            (leg,) = await wait_legs(path)
            assert leg["src_id"] == SLEEP_ID and leg["outcome"] == "ok"
        finally:
            await hb.server.close()
            app.close()

    asyncio.run(main())


def test_parse_baggage_roundtrip_of_default() -> None:
    from netlab.mesh.sidecar.outbound import default_baggage

    b = parse_baggage(default_baggage(lab_registry().workloads[SLEEP_IP], "v1"))
    assert b == {"k8s.cluster.name": "Kubernetes", "k8s.namespace.name": "foo", "k8s.deployment.name": "sleep",
                 "service.name": "sleep", "service.version": "v1"}
