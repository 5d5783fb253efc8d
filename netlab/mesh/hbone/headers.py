"""The headers of an HBONE CONNECT (ZT-PROXY, ZT-OUT): baggage, Forwarded, traceparent, :authority.

Pure string functions: what ztunnel and Envoy put in a CONNECT and how the lab reads them back.
"""

from __future__ import annotations

import ipaddress
import re
import secrets

from netlab.istio import DEFAULT_CLUSTER_NAME

BAGGAGE_HEADER = "baggage"
FORWARDED_HEADER = "forwarded"
TRACEPARENT_HEADER = "traceparent"


def baggage_header(
    *,
    namespace: str,
    workload_name: str,
    service_name: str | None = None,
    service_version: str = "latest",
    workload_type: str = "deployment",
    cluster: str = DEFAULT_CLUSTER_NAME,
) -> str:
    """``baggage`` value in ztunnel's format (k8s.cluster.name=...,...,service.version=...)."""
    return (
        f"k8s.cluster.name={cluster},k8s.namespace.name={namespace},"
        f"k8s.{workload_type}.name={workload_name},"
        f"service.name={service_name or workload_name},service.version={service_version}"
    )


def parse_baggage(value: str | None) -> dict[str, str]:
    """``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}`` (W3C baggage, properties dropped)."""
    out: dict[str, str] = {}
    for item in (value or "").split(","):
        k, sep, v = item.split(";", 1)[0].strip().partition("=")
        if sep and k:
            out[k.strip()] = v.strip()
    return out


def forwarded_header(client_ip: str) -> str:
    """RFC 7239 ``for=`` element; IPv6 is quoted and bracketed."""
    ip = ipaddress.ip_address(client_ip)
    return f'for="[{ip}]"' if ip.version == 6 else f"for={ip}"


_FOR_RE = re.compile(r'(?i)(?:^|[;,\s])for=("?)\[?([0-9a-fA-F:.]+)\]?(?::\d+)?\1')


def parse_forwarded_for(value: str | None) -> str | None:
    """First ``for=`` IP of a Forwarded header, or None (ztunnel ``get_original_src_from_fwded``)."""
    if not value:
        return None
    m = _FOR_RE.search(value)
    if not m:
        return None
    try:
        return str(ipaddress.ip_address(m.group(2)))
    except ValueError:
        return None


def new_traceparent() -> str:
    """``00-<32 hex trace id>-<16 hex parent id>-00`` (ZT-PROXY ``TraceParent``)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


def parse_authority(authority: str) -> tuple[str, int] | None:
    """``ip:port`` / ``[v6]:port`` -> (ip, port); None unless it is a literal socket address."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    p = int(port)
    if p > 65535:
        return None
    return str(ip), p


def format_authority(ip: str, port: int) -> str:
    """(ip, port) -> ``ip:port``, ``[v6]:port``: the ``:authority`` a CONNECT names a target by."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
