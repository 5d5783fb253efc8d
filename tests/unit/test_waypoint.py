"""Waypoint on loopback: terminate HBONE, route by authority, originate a new HBONE (reference §7)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from netlab import istio
from netlab.mesh.hbone import HboneError, baggage_header, forwarded_header, hbone_connect
from netlab.mesh.waypoint.proxy import Waypoint
from tests.unit.test_sidecar_support import (
    HELLO_IP,
    HELLO_VIP,
    OTHER_IP,
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
WP_ID = istio.spiffe_id("bar-2", "waypoint-istio-waypoint")
HELLO_ID = istio.spiffe_id("bar-2", "helloworld")


async def _setup(tmp: Path, scope_sa: str | None = None):
    reg = lab_registry()
    certs = make_certs(tmp)
    app, app_port, app_peers = await echo_server()
    zt = await fake_ztunnel(certs, reg, HELLO_IP, app_port)
    zt_other = await fake_ztunnel(certs, reg, OTHER_IP, app_port, port=zt.port)
    clog, path = conn_log(tmp, "waypoint.bar-2")
    wp = Waypoint(reg=reg, me=reg.workloads[WAYPOINT_IP], cert=certs.pair(WP_ID), ca=certs.ca_path, conn_log=clog,
                  component="waypoint.bar-2", scope_sa=scope_sa, hbone_port=zt.port)
    s = socket.socket()
    s.bind((WAYPOINT_IP, 0))
    await wp.server.start(sock=s)
    wp_addr = (WAYPOINT_IP, s.getsockname()[1])

    async def call(authority: str, payload: bytes = b"ping") -> bytes:
        c, k = certs.pair(SLEEP_ID)
        st = await hbone_connect(wp_addr, authority, client_cert=c, client_key=k, ca=certs.ca_path,
                                 expected_identity=WP_ID, source=(SLEEP_IP, 0),
                                 headers={"baggage": baggage_header(namespace="foo", workload_name="sleep"),
                                          "forwarded": forwarded_header(SLEEP_IP)})
        st.write(payload)
        st.write_eof()
        return await st.read_all()

    async def close() -> None:
        await wp.server.close()
        await zt.server.close()
        await zt_other.server.close()
        app.close()

    return wp, zt, path, call, close, app_peers


def test_vip_authority_goes_to_endpoint_with_new_hbone_and_no_headers(tmp_path: Path) -> None:
    async def main() -> None:
        wp, zt, path, call, close, _ = await _setup(tmp_path)
        try:
            assert await call(f"{HELLO_VIP}:5000", b"hello") == b"hello"
            (req,) = zt.requests
            assert req.authority == f"{HELLO_IP}:5000"  # VIP resolved by the waypoint, targetPort
            assert req.peer_identity == WP_ID  # the waypoint's own client cert
            assert req.peer_addr[0] == WAYPOINT_IP  # its own IP, no spoofing
            assert req.header("baggage") is None and req.header("forwarded") is None  # §7: no headers added
            (leg,) = await wait_legs(path)
            assert leg["listener"] == "inbound:15008" and leg["src"].startswith(SLEEP_IP + ":")
            assert leg["orig_dst"] == f"{HELLO_VIP}:5000" and leg["authority"] == f"{HELLO_IP}:5000"
            assert leg["src_id"] == SLEEP_ID and leg["dst_id"] == HELLO_ID and leg["proto"] == "hbone"
            assert leg["up_src"] == f"{req.peer_addr[0]}:{req.peer_addr[1]}"  # joins the next leg
            assert leg["up_dst"] == f"{HELLO_IP}:{zt.port}" and leg["extra"]["via"] == "vip"
            assert (leg["bytes_up"], leg["bytes_down"], leg["outcome"]) == (5, 5, "ok")
        finally:
            await close()

    asyncio.run(main())


def test_pod_authority_keeps_port(tmp_path: Path) -> None:
    async def main() -> None:
        wp, zt, path, call, close, _ = await _setup(tmp_path)
        try:
            assert await call(f"{HELLO_IP}:5000") == b"ping"
            assert zt.requests[0].authority == f"{HELLO_IP}:5000"
            assert (await wait_legs(path))[0]["extra"]["via"] == "pod"
        finally:
            await close()

    asyncio.run(main())


@pytest.mark.parametrize("authority,status", [
    (f"{OTHER_IP}:5000", 401),  # pod outside the waypoint's namespace
    ("10.9.9.9:80", 404),  # nobody
    ("10.96.0.13:80", 503),  # a VIP with no endpoint in scope
])
def test_out_of_scope_and_unknown(tmp_path: Path, authority: str, status: int) -> None:
    async def main() -> None:
        wp, zt, path, call, close, _ = await _setup(tmp_path)
        try:
            with pytest.raises(HboneError) as ei:
                await call(authority)
            assert ei.value.status == status
            assert not zt.requests
            (leg,) = await wait_legs(path)
            assert leg["outcome"] == str(status)
        finally:
            await close()

    asyncio.run(main())


def test_sa_scope_excludes_other_service_accounts(tmp_path: Path) -> None:
    async def main() -> None:
        wp, zt, path, call, close, _ = await _setup(tmp_path, scope_sa="someone-else")
        try:
            with pytest.raises(HboneError) as ei:
                await call(f"{HELLO_VIP}:5000")
            assert ei.value.status == 503
        finally:
            await close()

    asyncio.run(main())


def test_destination_must_present_its_own_identity(tmp_path: Path) -> None:
    """A server at helloworld's IP with another workload's cert is refused (exact SAN), -> 503."""

    async def main() -> None:
        reg = lab_registry()
        certs = make_certs(tmp_path)
        app, app_port, _ = await echo_server()
        wrong = reg.workloads[OTHER_IP]
        imposter = await fake_ztunnel(certs, reg, OTHER_IP, app_port)
        # re-bind the imposter's cert on helloworld's IP
        from netlab.mesh.hbone import HboneServer
        from netlab.mesh.relay import tcp_connect

        pair = certs.pair(wrong.identity)
        srv = HboneServer(handler=lambda req: tcp_connect(("127.0.0.1", app_port)), cert_for=lambda ip: pair,
                          default_cert=pair, ca=certs.ca_path, check_authority=False)
        s = socket.socket()
        s.bind((HELLO_IP, 0))
        await srv.start(sock=s)
        clog, path = conn_log(tmp_path, "wp")
        wp = Waypoint(reg=reg, me=reg.workloads[WAYPOINT_IP], cert=certs.pair(WP_ID), ca=certs.ca_path,
                      conn_log=clog, component="wp", hbone_port=s.getsockname()[1])
        try:
            target = wp.route((HELLO_VIP, 5000))
            assert not isinstance(target, int)
            from netlab.mesh.hbone import ConnectRequest

            req = ConnectRequest(authority=f"{HELLO_VIP}:5000", dest=(HELLO_VIP, 5000), peer_identity=SLEEP_ID,
                                 peer_addr=(SLEEP_IP, 1), local_addr=(WAYPOINT_IP, 15008))
            assert await wp.handle(req) == 503
            (leg,) = await wait_legs(path)
            assert leg["outcome"].startswith("error:") and "identity" in leg["outcome"]
        finally:
            await srv.close()
            await imposter.server.close()
            app.close()

    asyncio.run(main())
