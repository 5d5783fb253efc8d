"""Security of ztunnel's inbound HBONE (reference §5.1) and L4 authorization policies (docs/policies.md).

Two labs from one topology (ambient foo/bar/bar-2 with a waypoint for bar-2, plus a plain
``legacy`` pod): ``hxsec`` without policies, ``hxsecp`` with a DENY for namespace foo on bar.
Every attacker connection is made from inside the plain pod's netns (a thread in that netns),
straight to a pod IP on :15008, so it lands on the destination node's ztunnel through the lab's
own routes (table 100 -> istioin -> TPROXY).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from netlab import netns as ns
from netlab.lab import Lab
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.ca import LabCA
from netlab.mesh.connlog import read_legs
from netlab.mesh.hbone import HboneError, HboneTlsError, hbone_connect

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates namespaces)")]

TOPOLOGY = """\
name: hxsec
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  foo: {labels: {istio.io/dataplane-mode: ambient}}
  bar: {labels: {istio.io/dataplane-mode: ambient}}
  bar-2: {labels: {istio.io/dataplane-mode: ambient}}
  legacy: {}
pods:
  - {name: sleep, namespace: foo, node: node-a, app: sleep, serviceAccount: sleep}
  - {name: sleep, namespace: legacy, node: node-a, app: sleep}
  - {name: httpbin, namespace: bar, node: node-b, app: httpbin, serviceAccount: httpbin, ports: [80], labels: {svc: remote}}
  - {name: httpbin-local, namespace: bar, node: node-a, app: httpbin, serviceAccount: httpbin, ports: [80], labels: {svc: local}}
  - {name: helloworld, namespace: bar-2, node: node-b, app: helloworld, serviceAccount: helloworld, ports: [5000]}
services:
  - {name: httpbin, namespace: bar, port: 8000, targetPort: 80, selector: {svc: remote}}
  - {name: httpbin-local, namespace: bar, port: 8000, targetPort: 80, selector: {svc: local}}
  - {name: helloworld, namespace: bar-2, port: 5000, targetPort: 5000, selector: {app: helloworld}}
waypoints:
  - {namespace: bar-2, node: node-a}
"""
POLICY = """\
policies:
  - {name: deny-foo, namespace: bar, action: DENY, from: ["ns/foo"]}
"""
SLEEP_ID = "spiffe://cluster.local/ns/foo/sa/sleep"
HTTPBIN_ID = "spiffe://cluster.local/ns/bar/sa/httpbin"
CURL = ["curl", "-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"]
T = TypeVar("T")


def _up(tmp: Path, name: str, extra: str = "") -> Lab:
    f = tmp / f"{name}.yaml"
    f.write_text(TOPOLOGY.replace("name: hxsec", f"name: {name}") + extra)
    return Lab.up(str(f), name=name, tunnel="userspace")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("hxsec")
    mp = pytest.MonkeyPatch()
    mp.setenv("NETLAB_RUN_DIR", str(d / "run"))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def lab(run_dir: Path) -> Iterator[Lab]:
    lab = _up(run_dir, "hxsec")
    try:
        yield lab
    finally:
        Lab.down_lab("hxsec")


@pytest.fixture(scope="module")
def plab(run_dir: Path) -> Iterator[Lab]:
    lab = _up(run_dir, "hxsecp", POLICY)
    try:
        yield lab
    finally:
        Lab.down_lab("hxsecp")


@pytest.fixture(autouse=True)
def netlab_run_dir(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETLAB_RUN_DIR", str(run_dir / "run"))


def in_pod(lab: Lab, pod: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that sits in the pod's netns (setns is per thread)."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            with ns.in_netns(lab.netns_of(pod)):
                out["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["e"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert not t.is_alive(), "client thread hung"
    if "e" in out:
        raise out["e"]
    return out["v"]


def ip(lab: Lab, ref: str) -> str:
    return lab.pod(ref).ip


def hbone(lab: Lab, dst_ip: str, authority: str, cert: Path, key: Path, *, expect: str | None = None,
          payload: bytes | None = None) -> bytes:
    """CONNECT from the plain pod; with ``payload``, send it through the tunnel and return the reply."""
    ca = MeshContext.for_lab(lab.name).ca_cert

    async def go() -> bytes:
        s = await hbone_connect((dst_ip, 15008), authority, client_cert=cert, client_key=key, ca=ca,
                                expected_identity=expect, timeout=5)
        try:
            if payload is None:
                return b""
            s.write(payload)
            return await asyncio.wait_for(s.read(4096), 5)
        finally:
            s.abort()

    return in_pod(lab, "legacy/sleep", lambda: asyncio.run(go()))


def self_signed(d: Path, identity: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
            .sign(key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


# ------------------------------------------------------------------------------------------ positive control
def test_valid_identity_gets_through(lab: Lab) -> None:
    cert, key = MeshContext.for_lab(lab.name).cert_for(SLEEP_ID)
    dst = ip(lab, "bar/httpbin")
    reply = hbone(lab, dst, f"{dst}:80", cert, key, expect=HTTPBIN_ID,
                  payload=b"GET /get HTTP/1.1\r\nHost: httpbin\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


# ------------------------------------------------------------------------------------------ TLS refusals
def test_no_client_certificate_fails_the_handshake(lab: Lab) -> None:
    ca = MeshContext.for_lab(lab.name).ca_cert
    dst = ip(lab, "bar/httpbin")

    def probe() -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(ca)
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection((dst, 15008), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=None) as s:
                    # TLS 1.3: the server checks the client's (empty) Certificate after the
                    # client's Finished, so the refusal shows on the first read as an alert or EOF.
                    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                    data = s.recv(1024)
                    return "accepted" if data else "eof"
            except ssl.SSLError as e:
                return f"alert:{e.reason}"
            except (ConnectionResetError, BrokenPipeError):
                return "reset"

    outcome = in_pod(lab, "legacy/sleep", probe)
    assert outcome != "accepted", "ztunnel spoke HTTP/2 to a client without a certificate"
    assert outcome.startswith("alert:") or outcome in ("eof", "reset"), outcome


def test_certificate_from_another_trust_domain_is_rejected(lab: Lab, tmp_path: Path) -> None:
    dst = ip(lab, "bar/httpbin")
    # (a) signed by an unrelated root of trust domain evil.local
    evil = LabCA.create(tmp_path / "evil", trust_domain="evil.local", common_name="evil CA")
    cert, key = evil.issue("spiffe://evil.local/ns/foo/sa/sleep")
    with pytest.raises(HboneTlsError):
        hbone(lab, dst, f"{dst}:80", cert, key, expect=HTTPBIN_ID)
    # (b) signed by the lab's own root, but naming another trust domain
    lab_ca = LabCA.load(Path(lab.state_dir) / "ca")
    cert, key = lab_ca.issue("spiffe://evil.local/ns/foo/sa/sleep", strict=False)
    with pytest.raises(HboneTlsError):
        hbone(lab, dst, f"{dst}:80", cert, key, expect=HTTPBIN_ID)


def test_forged_sleep_identity_fails_tls(lab: Lab, tmp_path: Path) -> None:
    """A plain pod claiming to be foo/sleep: self-signed, or from a rogue CA of the same trust domain."""
    dst = ip(lab, "bar/httpbin")
    cert, key = self_signed(tmp_path / "self", SLEEP_ID)
    with pytest.raises(HboneTlsError) as e:
        hbone(lab, dst, f"{dst}:80", cert, key, expect=HTTPBIN_ID)
    assert e.value.status is None
    rogue = LabCA.create(tmp_path / "rogue", trust_domain="cluster.local", common_name="rogue CA")
    cert, key = rogue.issue(SLEEP_ID)
    with pytest.raises(HboneTlsError) as e:
        hbone(lab, dst, f"{dst}:80", cert, key, expect=HTTPBIN_ID)
    assert e.value.status is None


# ------------------------------------------------------------------------------------------ CONNECT refusals
def test_authority_mismatch_is_400(lab: Lab) -> None:
    cert, key = MeshContext.for_lab(lab.name).cert_for(SLEEP_ID)
    dst = ip(lab, "bar/httpbin")
    with pytest.raises(HboneError) as e:
        hbone(lab, dst, f"{ip(lab, 'bar/httpbin-local')}:80", cert, key, expect=HTTPBIN_ID)
    assert e.value.status == 400
    with pytest.raises(HboneError) as e:
        hbone(lab, dst, "httpbin.bar:80", cert, key, expect=HTTPBIN_ID)
    assert e.value.status == 400


def test_bypassing_the_waypoint_is_401(lab: Lab) -> None:
    cert, key = MeshContext.for_lab(lab.name).cert_for(SLEEP_ID)
    hw = ip(lab, "bar-2/helloworld")
    with pytest.raises(HboneError) as e:
        hbone(lab, hw, f"{hw}:5000", cert, key, expect="spiffe://cluster.local/ns/bar-2/sa/helloworld")
    assert e.value.status == 401
    legs = read_legs(Path(lab.state_dir) / "conn" / "ztunnel-node-b.jsonl")
    assert any(g["outcome"] == "401" and g["extra"].get("reason") == "BypassWaypoint" and g["src_id"] == SLEEP_ID
               for g in legs), legs[-3:]


# ------------------------------------------------------------------------------------------ policies
def test_without_policy_sleep_reaches_bar(lab: Lab) -> None:
    for url in ("http://httpbin.bar:8000/get", "http://httpbin-local.bar:8000/get"):
        r = lab.exec_capture("foo/sleep", [*CURL, url])
        assert r.stdout == "200", (url, r.stdout, r.stderr)


def test_deny_policy_blocks_sleep_and_logs_401_with_policy(plab: Lab) -> None:
    conn = Path(plab.state_dir) / "conn"
    # cross node: HBONE to node-b's ztunnel -> 401
    r = plab.exec_capture("foo/sleep", [*CURL, "http://httpbin.bar:8000/get"])
    assert r.stdout != "200", r.stdout
    legs = read_legs(conn / "ztunnel-node-b.jsonl")
    denied = [g for g in legs if g["listener"].startswith("inbound:15008") and g["outcome"] == "401"]
    assert denied and denied[-1]["extra"].get("policy") == "deny-foo" and denied[-1]["src_id"] == SLEEP_ID, legs
    out = read_legs(conn / "ztunnel-node-a.jsonl")
    assert any(g["listener"].startswith("outbound") and g["outcome"] == "401" for g in out), out
    # same node: the fast path applies the policy too -> refused (reset)
    r = plab.exec_capture("foo/sleep", [*CURL, "http://httpbin-local.bar:8000/get"])
    assert r.stdout != "200", r.stdout
    out = read_legs(conn / "ztunnel-node-a.jsonl")
    assert any(g["outcome"] == "refused" and g["extra"].get("reason") == "Denied"
               and g["extra"].get("policy") == "deny-foo" for g in out), out
    # the policy names namespace foo only: a plaintext caller (no identity) still gets in
    r = plab.exec_capture("legacy/sleep", [*CURL, "http://httpbin.bar:8000/get"])
    assert r.stdout == "200", (r.stdout, r.stderr)
