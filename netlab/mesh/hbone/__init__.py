"""HBONE: HTTP/2 CONNECT over mutual TLS 1.3, as ztunnel 1.18 speaks it (reference §5.1, §7).

Client (:func:`hbone_connect`) and server (:class:`HboneServer`) used by ztunnel, the sidecar's
HBONE legs and the waypoint. Behaviour mirrors ztunnel 1.18 (ZT-TLS ``boring.rs``, ZT-IN
``inbound.rs``, ZT-OUT ``outbound.rs``). The package's modules, bottom up:

* :mod:`.headers`: baggage, Forwarded, traceparent and ``:authority`` (pure strings);
* :mod:`.tls`: TLS 1.3 contexts with ALPN ``h2``, the peer's URI SANs, the handshake limits;
* :mod:`.frames`: RFC 9113 framing of the frames an established tunnel lives on (DATA,
  WINDOW_UPDATE, PING, RST_STREAM, GOAWAY), read without frame objects or payload copies;
* :mod:`.tls_protocol`: TLS driven by hand on a TCP transport (records filled to 16 KiB, one
  encryption and one ``send`` per turn);
* :mod:`.stream`: one CONNECT stream as an :class:`~netlab.mesh.endpoint.Endpoint`;
* :mod:`.connection`: HTTP/2 on one TLS connection: the tunnel's frames and flow control here,
  the preface, SETTINGS and HEADERS/HPACK in the h2 library; the one-call-per-request paths;
* :mod:`.client`: TCP -> mTLS -> one CONNECT, and its errors;
* :mod:`.server`: the listener that answers CONNECTs and relays each accepted one.

Proxy processes run it on uvloop (:func:`netlab.mesh.process.install_fast_loop`).
"""

from __future__ import annotations

from netlab.mesh.hbone.client import HboneError, HboneTlsError, HeadersArg, hbone_connect
from netlab.mesh.hbone.connection import HboneConnection, HboneStream
from netlab.mesh.hbone.headers import (
    BAGGAGE_HEADER,
    FORWARDED_HEADER,
    TRACEPARENT_HEADER,
    baggage_header,
    format_authority,
    forwarded_header,
    new_traceparent,
    parse_authority,
    parse_baggage,
    parse_forwarded_for,
)
from netlab.mesh.hbone.server import ConnectRequest, HboneServer
from netlab.mesh.hbone.tls import (
    HANDSHAKE_AND_PREFACE_TIMEOUT_S,
    TLS_HANDSHAKE_TIMEOUT_S,
    CertPair,
    client_context,
    peer_uri_sans,
    server_context,
)

__all__ = [
    "BAGGAGE_HEADER",
    "FORWARDED_HEADER",
    "HANDSHAKE_AND_PREFACE_TIMEOUT_S",
    "TLS_HANDSHAKE_TIMEOUT_S",
    "TRACEPARENT_HEADER",
    "CertPair",
    "ConnectRequest",
    "HboneConnection",
    "HboneError",
    "HboneServer",
    "HboneStream",
    "HboneTlsError",
    "HeadersArg",
    "baggage_header",
    "client_context",
    "format_authority",
    "forwarded_header",
    "hbone_connect",
    "new_traceparent",
    "parse_authority",
    "parse_baggage",
    "parse_forwarded_for",
    "peer_uri_sans",
    "server_context",
]
