"""ztunnel end to end in real namespaces: the seed article's ambient paths, HBONE on the wire.

Each lab is brought up once per module (``hz-*`` names) and torn down in the fixture's finally.
Outcomes are what the app saw (status, ``origin`` = TCP peer of httpbin), what crossed node-b's
uplink (captured with an AF_PACKET socket opened inside node-b's netns), and ztunnel's
connection-log lines.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab import netns as ns
from netlab.lab import Lab
from netlab.mesh.connlog import read_legs

pytestmark = pytest.mark.kernel

CURL = ["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("hz-zt-run")
    mp = pytest.MonkeyPatch()
    mp.setenv("NETLAB_RUN_DIR", str(d))
    yield d
    mp.undo()


@pytest.fixture(autouse=True)
def netlab_run_dir(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Overrides conftest's per-test run dir: the labs here live for the whole module."""
    monkeypatch.setenv("NETLAB_RUN_DIR", str(run_dir))
    return run_dir


def _lab(topology: str, name: str) -> Iterator[Lab]:
    if name in Lab.running():
        Lab.down_lab(name)
    lab = Lab.up(topology, name=name, tunnel="userspace")
    try:
        yield lab
    finally:
        Lab.down_lab(name)


@pytest.fixture(scope="module")
def a2a(run_dir: Path) -> Iterator[Lab]:
    yield from _lab("ambient-to-ambient", "hz-a2a")


@pytest.fixture(scope="module")
def p2a(run_dir: Path) -> Iterator[Lab]:
    yield from _lab("plain-to-ambient", "hz-p2a")


def curl(lab: Lab, pod: str, url: str) -> tuple[int, str]:
    r = lab.exec_capture(pod, [*CURL, url])
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def legs(lab: Lab, node: str) -> list[dict]:
    return read_legs(lab.state_dir / "conn" / f"ztunnel-{node}.jsonl")


def new_legs(lab: Lab, component: str, before: int, want: int = 1, timeout: float = 3.0) -> list[dict]:
    """Legs logged after the first ``before`` ones. A leg is written when its relay has finished,
    which can be a moment after the client already has its answer, so wait for ``want`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        got = read_legs(lab.state_dir / "conn" / f"{component}.jsonl")[before:]
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def ip(lab: Lab, ref: str) -> str:
    return lab.pod(ref).ip


# ------------------------------------------------------------------------------------------------ capture
class Capture:
    """AF_PACKET capture of one interface of one netns, in a thread (no tshark, no root-ns access)."""

    def __init__(self, netns: str, ifname: str) -> None:
        self.netns, self.ifname = netns, ifname
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with ns.in_netns(self.netns):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
        try:
            s.bind((self.ifname, 0))
            s.settimeout(0.1)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    self.frames.append(s.recv(65535))
                except TimeoutError:
                    continue
        finally:
            s.close()

    def __enter__(self) -> Capture:
        self._t.start()
        assert self._ready.wait(5), "capture did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)
        self._stop.set()
        self._t.join(5)

    def tcp(self) -> list[tuple[str, int, str, int, bytes]]:
        """(src, sport, dst, dport, payload) of every IPv4/TCP frame."""
        out = []
        for f in self.frames:
            if len(f) < 34 or struct.unpack_from("!H", f, 12)[0] != 0x0800:
                continue
            ihl = (f[14] & 0x0F) * 4
            if f[23] != 6:
                continue
            total = struct.unpack_from("!H", f, 16)[0]
            src, dst = socket.inet_ntoa(f[26:30]), socket.inet_ntoa(f[30:34])
            t = 14 + ihl
            sport, dport = struct.unpack_from("!HH", f, t)
            doff = (f[t + 12] >> 4) * 4
            out.append((src, sport, dst, dport, f[t + doff:14 + total]))
        return out


# ------------------------------------------------------------------------------------------------ a2a
def test_cross_node_hbone_keeps_client_ip_and_is_encrypted_on_the_wire(a2a: Lab) -> None:
    sleep, httpbin = ip(a2a, "foo/sleep"), ip(a2a, "bar/httpbin")
    na, nb = len(legs(a2a, "node-a")), len(legs(a2a, "node-b"))
    with Capture(a2a.netns_of("node-b"), "eth0") as cap:
        code, body = curl(a2a, "foo/sleep", "http://httpbin.bar:8000/ip")
    assert code == 200, body
    assert json.loads(body)["origin"] == sleep

    segs = cap.tcp()
    hb = [s for s in segs if 15008 in (s[1], s[3])]
    assert hb, f"no TCP to/from :15008 on node-b eth0 ({len(segs)} TCP segments)"
    assert {(s[0], s[2]) for s in hb if s[3] == 15008} == {(sleep, httpbin)}  # spoofed source, pod IP dest
    hello = [p for (_, _, _, dp, p) in hb if dp == 15008 and p[:1] == b"\x16" and p[5:6] == b"\x01"]
    server_hello = [p for (_, sp, _, _, p) in hb if sp == 15008 and p[:1] == b"\x16" and p[5:6] == b"\x02"]
    assert hello and b"\x02h2" in hello[0], "ClientHello with ALPN h2 expected"
    assert server_hello and b"\x00\x2b\x00\x02\x03\x04" in server_hello[0], "ServerHello must select TLS 1.3"
    wire = b"".join(p for *_, p in segs)
    assert b"GET /ip" not in wire and b"origin" not in wire and b"curl/" not in wire
    assert not [s for s in segs if 80 in (s[1], s[3])], "plaintext :80 must not cross the uplink"

    # connection log: node-a's upstream 4-tuple is node-b's downstream 4-tuple
    [out] = new_legs(a2a, "ztunnel-node-a", na)
    assert out["extra"]["route"] == "hbone" and out["orig_dst"].endswith(":8000")
    assert out["listener"] == "outbound:15001" and out["proto"] == "hbone" and out["outcome"] == "ok"
    assert out["up_dst"] == f"{httpbin}:15008" and out["authority"] == f"{httpbin}:80"
    assert out["up_src"].startswith(sleep + ":") and out["src"].startswith(sleep + ":")
    assert out["src_id"] == "spiffe://cluster.local/ns/foo/sa/sleep"
    assert out["dst_id"] == "spiffe://cluster.local/ns/bar/sa/httpbin"
    [inn] = new_legs(a2a, "ztunnel-node-b", nb)
    assert inn["src"] == out["up_src"]
    assert inn["listener"] == "inbound:15008" and inn["local"] == out["up_dst"] and inn["outcome"] == "ok"
    assert inn["up_src"].startswith(sleep + ":") and inn["up_dst"] == f"{httpbin}:80"
    assert inn["src_id"] == out["src_id"]
    assert inn["bytes_up"] == out["bytes_up"] > 0 and inn["bytes_down"] == out["bytes_down"] > 0


def test_same_node_fast_path(a2a: Lab) -> None:
    sleep, local = ip(a2a, "foo/sleep"), ip(a2a, "bar/httpbin-local")
    na, before_b = len(legs(a2a, "node-a")), len(legs(a2a, "node-b"))
    with Capture(a2a.netns_of("node-a"), "eth0") as cap:
        code, body = curl(a2a, "foo/sleep", "http://httpbin-local.bar:8000/ip")
    assert code == 200, body
    assert json.loads(body)["origin"] == sleep
    [leg] = new_legs(a2a, "ztunnel-node-a", na)
    assert leg["extra"]["route"] == "fast_path" and leg["proto"] == "tcp" and leg["outcome"] == "ok"
    assert leg["up_dst"] == f"{local}:80" and leg["up_src"].startswith(sleep + ":")
    assert len(legs(a2a, "node-b")) == before_b  # never left the node
    assert not [s for s in cap.tcp() if 15008 in (s[1], s[3])]


def test_many_requests_and_headers(a2a: Lab) -> None:
    for _ in range(10):
        code, body = curl(a2a, "foo/sleep", "http://httpbin.bar:8000/headers")
        assert code == 200 and json.loads(body)["headers"]["Host"] == "httpbin.bar:8000"


def test_readiness_and_refusals(a2a: Lab) -> None:
    zt = "ztunnel:node-a"
    r = a2a.exec_capture(zt, [*CURL, "http://127.0.0.1:15021/healthz/ready"])
    assert r.stdout.endswith("\n200"), r.stdout
    r = a2a.exec_capture(zt, [*CURL, "http://127.0.0.1:15021/nope"])
    assert r.stdout.endswith("\n404"), r.stdout
    # 127.0.0.1 is no workload: the outbound listener resets it (UnknownSource)
    na = len(legs(a2a, "node-a"))
    r = a2a.exec_capture(zt, [*CURL, "http://127.0.0.1:15001/"])
    assert r.returncode != 0 and r.stdout.endswith("\n000")
    [last] = new_legs(a2a, "ztunnel-node-a", na)
    assert last["outcome"] == "refused" and last["extra"]["reason"] == "UnknownSource"


# ------------------------------------------------------------------------------------------------ plain -> ambient
def test_plain_client_to_ambient_pod_via_inbound_plaintext(p2a: Lab) -> None:
    client, httpbin = ip(p2a, "legacy/sleep"), ip(p2a, "bar/httpbin")
    nb = len(legs(p2a, "node-b"))
    code, body = curl(p2a, "legacy/sleep", f"http://{httpbin}:80/ip")
    assert code == 200, body
    assert json.loads(body)["origin"] == client
    [leg] = new_legs(p2a, "ztunnel-node-b", nb)
    assert leg["listener"] == "inbound-plaintext:15006" and leg["outcome"] == "ok"
    assert leg["src"].startswith(client + ":") and leg["orig_dst"] == f"{httpbin}:80"
    assert leg["up_src"].startswith(client + ":") and leg["up_dst"] == f"{httpbin}:80"
    assert leg["bytes_up"] > 0 and leg["bytes_down"] > 0
    assert legs(p2a, "node-a") == []  # the plain client is not captured on its node


def test_inbound_hbone_statuses(a2a: Lab) -> None:
    """Direct HBONE to node-b's 15008 from node-a's ztunnel netns (unspoofed, as sleep's identity):
    good authority -> 200 + bytes; authority IP != destination -> 400; nothing on the port -> 503;
    ztunnel's own IP (no workload, ztunnel cert) -> 404. Each refusal gets a log line."""
    import asyncio

    from netlab.mesh import hbone
    from netlab.mesh.bootstrap import MeshContext, ztunnel_identity

    ctx = MeshContext.for_lab(a2a.name)
    sleep_id = "spiffe://cluster.local/ns/foo/sa/sleep"
    httpbin_id = "spiffe://cluster.local/ns/bar/sa/httpbin"
    cert, key = ctx.cert_for(sleep_id)
    pod, zt_b = ip(a2a, "bar/httpbin"), ctx.registry.ztunnels["node-b"]

    async def one(addr: str, authority: str, expect: str) -> int | bytes:
        try:
            s = await hbone.hbone_connect((addr, 15008), authority, client_cert=cert, client_key=key,
                                          ca=ctx.ca_cert, expected_identity=expect, timeout=5)
        except hbone.HboneError as e:
            return e.status or -1
        s.write(b"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        s.write_eof()
        data = await s.read_all()
        s.close()
        return data

    async def main() -> list[int | bytes]:
        return [await one(pod, f"{pod}:80", httpbin_id), await one(pod, "10.0.2.99:80", httpbin_id),
                await one(pod, f"{pod}:81", httpbin_id), await one(zt_b, f"{zt_b}:15021", ztunnel_identity())]

    box: dict[str, list[int | bytes]] = {}
    nb = len(legs(a2a, "node-b"))

    def run() -> None:
        with ns.in_netns(a2a.netns_of("ztunnel:node-a")):
            box["r"] = asyncio.run(main())

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    ok, bad_authority, refused, unknown = box["r"]
    tail = new_legs(a2a, "ztunnel-node-b", nb, want=4)
    assert isinstance(ok, bytes) and ok.startswith(b"HTTP/1.1 200") and b'"origin": "10.0.1.2"' in ok
    assert (bad_authority, refused, unknown) == (400, 503, 404)
    by_outcome = {g["outcome"]: g for g in tail}
    assert sorted(by_outcome) == ["400", "404", "503", "ok"]
    assert by_outcome["400"]["extra"]["reason"] == "BadAuthority"
    assert by_outcome["404"]["extra"]["reason"] == "UnknownWorkload"
    assert by_outcome["503"]["up_dst"] == f"{pod}:81" and by_outcome["ok"]["up_src"].startswith("10.0.1.2:")
