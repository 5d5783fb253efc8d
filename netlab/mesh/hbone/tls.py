"""HBONE's TLS: mutual TLS 1.3 with ALPN ``h2``, chains checked against the lab CA (ZT-TLS ``boring.rs``).

No SNI and no hostname check: identities are URI SANs, checked by the caller after the chain
check (:func:`peer_uri_sans`, :func:`spiffe_trust_domain`). Contexts are cached per (cert, key, CA):
building one reads and parses PEM files, and a proxy makes a connection per request.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from typing import Any, cast

from netlab.istio import HBONE_ALPN

PathLike = str | os.PathLike[str]
CertPair = tuple[PathLike, PathLike]
CaPaths = PathLike | Sequence[PathLike]

# The lab's limit for a TLS handshake, both sides, and for the CONNECT response after it. Envoy's
# connect_originate ``connect_timeout: 2s`` (§5.2) covers TCP + TLS, but a BoringSSL handshake
# costs Envoy a fraction of what OpenSSL 3.0 + Python cost us (~1 ms CPU a side before any h2),
# so 1000 new connections on 2 shared cores queue for seconds; the 2 s stays on the TCP connect
# and the handshake gets ztunnel's 10 s (docs/deviations.md).
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# How long an accepted HBONE connection may take to finish the TLS handshake *and* send the
# HTTP/2 client preface (magic + SETTINGS), counted from accept. ztunnel 1.18 accepts through
# tls-listener 0.6 (its Cargo.toml), whose default handshake timeout is 10 s (tls-listener
# CHANGELOG 0.6.0: "Increased default handshake timeout to 10 seconds"); the lab applies it to
# the preface too, so a peer that completes mTLS and then says nothing is cut after 10 s
# instead of holding a connection (and its TLS state) forever.
HANDSHAKE_AND_PREFACE_TIMEOUT_S = TLS_HANDSHAKE_TIMEOUT_S


def _ca_list(ca: CaPaths) -> list[PathLike]:
    return [ca] if isinstance(ca, (str, os.PathLike)) else list(ca)


def _base_context(purpose: ssl._SSLMethod, cert: PathLike, key: PathLike, ca: CaPaths) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([HBONE_ALPN])
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    for c in _ca_list(ca):
        ctx.load_verify_locations(os.fspath(c))
    ctx.check_hostname = False  # identities are URI SANs, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


_ctx_cache: dict[tuple[Any, ...], ssl.SSLContext] = {}


def _cached(purpose: ssl._SSLMethod, cert: PathLike, key: PathLike, ca: CaPaths) -> ssl.SSLContext:
    k = (purpose, os.fspath(cert), os.fspath(key), tuple(os.fspath(c) for c in _ca_list(ca)))
    ctx = _ctx_cache.get(k)
    if ctx is None:
        ctx = _ctx_cache[k] = _base_context(purpose, cert, key, ca)
    return ctx


def client_context(cert: PathLike, key: PathLike, ca: CaPaths) -> ssl.SSLContext:
    """Client side: our workload cert, verify the server chain, no hostname check (cached)."""
    return _cached(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca)


def server_context(cert: PathLike, key: PathLike, ca: CaPaths) -> ssl.SSLContext:
    """Server side: the destination workload's cert, client cert required (cached).

    No TLS 1.3 session tickets: HBONE clients never resume (ztunnel makes every connection
    afresh, and so does :func:`~netlab.mesh.hbone.client.hbone_connect`), so the two tickets
    OpenSSL sends after each handshake were encrypted and sent for nothing.
    """
    ctx = _cached(ssl.PROTOCOL_TLS_SERVER, cert, key, ca)
    ctx.num_tickets = 0
    return ctx


def peer_uri_sans(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> list[str]:
    """URI SANs of the verified peer certificate."""
    if ssl_object is None:
        return []
    cert = ssl_object.getpeercert()
    if not cert:
        return []
    sans = cast(tuple[tuple[str, str], ...], cert.get("subjectAltName", ()))
    return [v for (t, v) in sans if t == "URI"]


def spiffe_trust_domain(identity: str) -> str | None:
    """``spiffe://<td>/ns/...`` -> ``<td>``; None for anything that is no SPIFFE ID.

    Lenient, unlike :func:`netlab.mesh.ca.trust_domain_of` (which validates what the CA signs):
    this reads what a peer presented, and anything unreadable simply matches no trust domain."""
    if not identity.startswith("spiffe://"):
        return None
    return identity[len("spiffe://") :].split("/", 1)[0]
