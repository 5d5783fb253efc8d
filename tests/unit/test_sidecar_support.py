"""Loopback fixtures for the sidecar and waypoint unit tests (no namespaces, no root).

Pods are 127.0.0.x addresses (all local on ``lo``), so the proxies' real sockets, TLS and
HBONE run unchanged; only the well-known ports are swapped for ephemeral ones.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from netlab import istio
from netlab.mesh.ca import LabCA
from netlab.mesh.connlog import ConnLog, prepare, read_legs
from netlab.mesh.hbone import ConnectRequest, HboneServer
from netlab.mesh.registry import Registry, ServiceEntry, Workload
from netlab.mesh.relay import Endpoint, tcp_connect

WAYPOINT_IP, HELLO_IP, OTHER_IP, SLEEP_IP, NATIVE_IP, PLAIN_IP = (
    "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.7", "127.0.0.8")
HELLO_VIP, HTTPBIN_VIP = "10.96.0.11", "10.96.0.12"


def wl(name: str, ns: str, ip: str, sa: str, mode: str, proto: str = "HBONE", **kw) -> Workload:
    return Workload(name=name, namespace=ns, ip=ip, node="node-x", service_account=sa,
                    identity=istio.spiffe_id(ns, sa), protocol=proto, mode=mode, app=name, **kw)  # type: ignore[arg-type]


def lab_registry() -> Registry:
    """bar-2: helloworld (ambient, waypoint) + waypoint; other: another ambient pod; foo: sleep (sidecar);
    bar-1: a native-HBONE sidecar pod and a plain (TCP) sidecar pod behind one VIP each."""
    reg = Registry(trust_domain=istio.TRUST_DOMAIN)
    for w in (
        wl("waypoint", "bar-2", WAYPOINT_IP, "waypoint-istio-waypoint", "waypoint"),
        wl("helloworld", "bar-2", HELLO_IP, "helloworld", "ambient", waypoints=(WAYPOINT_IP,)),
        wl("other", "other", OTHER_IP, "other", "ambient"),
        wl("sleep", "foo", SLEEP_IP, "sleep", "sidecar", "TCP"),
        wl("native", "bar-1", NATIVE_IP, "native", "sidecar", native_hbone=True),
        wl("httpbin", "bar-1", PLAIN_IP, "httpbin", "sidecar", "TCP"),
    ):
        reg.workloads[w.ip] = w
    reg.services[f"{HELLO_VIP}:5000"] = ServiceEntry("helloworld", "bar-2", HELLO_VIP, 5000, 5000, (HELLO_IP,))
    reg.services[f"{HTTPBIN_VIP}:8000"] = ServiceEntry("httpbin", "bar-1", HTTPBIN_VIP, 8000, 80, (PLAIN_IP,))
    reg.services["10.96.0.13:80"] = ServiceEntry("empty", "bar-1", "10.96.0.13", 80, 80, ())
    return reg


@dataclass
class Certs:
    ca: LabCA

    @property
    def ca_path(self) -> str:
        return str(self.ca.ca_cert_path)

    def pair(self, identity: str, strict: bool = True) -> tuple[str, str]:
        c, k = self.ca.issue(identity, strict=strict)
        return str(c), str(k)


def make_certs(tmp: Path) -> Certs:
    return Certs(LabCA.open(tmp / "ca"))


async def echo_server(host: str = "127.0.0.1") -> tuple[asyncio.AbstractServer, int, list[tuple[str, int]]]:
    """TCP echo that records each client's address (what "the app saw")."""
    peers: list[tuple[str, int]] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peers.append(w.get_extra_info("peername")[:2])
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, host, 0)
    return srv, srv.sockets[0].getsockname()[1], peers


@dataclass
class FakeZtunnel:
    """An HBONE server on a pod IP standing in for the destination ztunnel; relays to an echo app."""

    server: HboneServer
    port: int
    requests: list[ConnectRequest] = field(default_factory=list)


async def fake_ztunnel(certs: Certs, reg: Registry, ip: str, app_port: int, port: int = 0,
                       check_authority: bool = True) -> FakeZtunnel:
    ident = reg.workloads[ip].identity
    pair = certs.pair(ident)
    box: list[ConnectRequest] = []

    async def handler(req: ConnectRequest) -> Endpoint | int:
        box.append(req)
        return await tcp_connect(("127.0.0.1", app_port))

    srv = HboneServer(handler=handler, cert_for=lambda lip: pair if lip == ip else None, default_cert=pair,
                      ca=certs.ca_path, check_authority=check_authority)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    await srv.start(sock=s)
    return FakeZtunnel(srv, s.getsockname()[1], box)


def conn_log(tmp: Path, name: str) -> tuple[ConnLog, Path]:
    """A component's connection log, its files made first as ``up`` makes them."""
    p = tmp / "conn" / f"{name}.jsonl"
    p.parent.mkdir(exist_ok=True)
    prepare(p, os.geteuid(), os.getegid())
    return ConnLog(p), p


async def wait_legs(path: Path, n: int = 1, timeout: float = 3.0) -> list[dict]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        legs = read_legs(path)
        if len(legs) >= n or loop.time() > end:
            return legs
        await asyncio.sleep(0.01)
