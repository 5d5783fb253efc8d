"""Lab CA: SPIFFE leaf certs, idempotent issuing, chain verification with the stdlib ssl."""

from __future__ import annotations

import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from netlab.istio import spiffe_id
from netlab.mesh.ca import CAError, LabCA, trust_domain_of, uri_sans


def test_create_load_roundtrip(tmp_path):
    ca = LabCA.create(tmp_path)
    assert ca.trust_domain == "cluster.local"
    cert = x509.load_pem_x509_certificate(ca.ca_cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "netlab lab CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    again = LabCA.load(tmp_path)
    assert again.cert == ca.cert and again.trust_domain == "cluster.local"
    with pytest.raises(CAError):
        LabCA.create(tmp_path)
    with pytest.raises(CAError):
        LabCA.load(tmp_path / "nope")


def test_issue_uri_san_only_and_idempotent(tmp_path):
    ca = LabCA.create(tmp_path)
    ident = spiffe_id("foo", "sleep")
    c1, k1 = ca.issue(ident)
    assert uri_sans(c1) == ["spiffe://cluster.local/ns/foo/sa/sleep"]
    leaf = x509.load_pem_x509_certificate(c1.read_bytes())
    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and len(san.value) == 1  # no DNS/IP names
    assert leaf.issuer == ca.cert.subject
    before = c1.read_bytes(), k1.read_bytes()
    c2, k2 = LabCA.load(tmp_path).issue(ident)
    assert (c2, k2) == (c1, k1) and (c2.read_bytes(), k2.read_bytes()) == before
    assert oct(k1.stat().st_mode & 0o777) == "0o600"


def test_leaf_verifies_against_ca_with_stdlib_ssl(tmp_path):
    """The pair loads into an SSLContext and its chain is accepted by a context trusting the CA."""
    ca = LabCA.create(tmp_path)
    cert, key = ca.issue(spiffe_id("a", "b"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)  # raises if key and cert do not match
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    leaf.verify_directly_issued_by(ca.cert)


def test_trust_domain_rules(tmp_path):
    ca = LabCA.create(tmp_path)
    with pytest.raises(CAError):
        ca.issue("spiffe://evil.local/ns/a/sa/b")
    c, _ = ca.issue("spiffe://evil.local/ns/a/sa/b", strict=False)
    assert uri_sans(c) == ["spiffe://evil.local/ns/a/sa/b"]
    with pytest.raises(CAError):
        ca.issue("http://cluster.local/ns/a/sa/b")
    assert trust_domain_of("spiffe://x.y/ns/a/sa/b") == "x.y"
    other = LabCA.create(tmp_path / "other", trust_domain="evil.local", common_name="evil CA")
    oc, _ = other.issue("spiffe://evil.local/ns/a/sa/b")
    assert LabCA.load(tmp_path / "other").trust_domain == "evil.local"
    with pytest.raises((ValueError, InvalidSignature)):  # another issuer, another key
        x509.load_pem_x509_certificate(oc.read_bytes()).verify_directly_issued_by(ca.cert)


def test_issue_is_fast_and_concurrency_safe(tmp_path):
    ca = LabCA.create(tmp_path)
    t0 = time.perf_counter()
    for i in range(100):
        ca.issue(spiffe_id(f"ns{i}", "default"))
    assert time.perf_counter() - t0 < 5.0
    ident = spiffe_id("race", "sa")
    with ThreadPoolExecutor(8) as ex:
        pairs = list(ex.map(lambda _: LabCA.load(tmp_path).issue(ident), range(16)))
    assert len(set(pairs)) == 1
    cert, key = pairs[0]
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)  # cert matches key
    assert not [p for p in (tmp_path / "certs").iterdir() if p.name.startswith(".")]
