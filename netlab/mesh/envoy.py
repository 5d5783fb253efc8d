"""What the lab's two Envoy-shaped proxies (sidecar, waypoint) share: Envoy's ``connect_originate``.

Both open HBONE the way Envoy's internal ``connect_originate`` listener does (§5.2): TCP to the
tunnel endpoint's :15008 within Envoy's 2 s ``connect_timeout``, then mTLS and the CONNECT. They
differ in whom they expect on the other side and which headers they send, which the caller says.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from netlab import istio
from netlab.mesh.connlog import Leg
from netlab.mesh.hbone import TLS_HANDSHAKE_TIMEOUT_S, CertPair, HboneError, HboneStream, HeadersArg, hbone_connect
from netlab.mesh.sockets import Address

# The TCP connect to :15008 gets Envoy's 2 s connect_timeout; the TLS handshake and the CONNECT
# response get the lab's limit, not Envoy's 2 s (docs/deviations.md)
HBONE_CONNECT_TIMEOUT_S = istio.WAYPOINT_CONNECT_TIMEOUT_S
HBONE_TLS_TIMEOUT_S = TLS_HANDSHAKE_TIMEOUT_S


async def connect_originate(leg: Leg, tunnel: Address, authority: str, *, cert: CertPair, ca: str,
                            expected_identity: str | Sequence[str], headers: HeadersArg = None,
                            source: Address | None = None) -> HboneStream:
    """Open HBONE to ``tunnel`` for ``authority``; the leg gets ``extra.hbone_ms`` (TCP + TLS +
    CONNECT). Raises :class:`HboneError` (see :func:`failure_outcome`), OSError, TimeoutError."""
    t0 = time.monotonic()
    try:
        return await hbone_connect(tunnel, authority, client_cert=cert[0], client_key=cert[1], ca=ca,
                                   expected_identity=expected_identity, headers=headers, source=source,
                                   timeout=HBONE_CONNECT_TIMEOUT_S, tls_timeout=HBONE_TLS_TIMEOUT_S)
    finally:
        leg.extra["hbone_ms"] = round((time.monotonic() - t0) * 1000, 1)


def failure_outcome(e: BaseException) -> str:
    """A failed ``connect_originate`` as a leg's outcome: the HBONE status that came back, else
    ``refused`` (nothing listens) or ``error:<why>``."""
    if isinstance(e, HboneError):
        return str(e.status) if e.status is not None else f"error:{e.reason}"
    return "refused" if isinstance(e, ConnectionRefusedError) else f"error:{e}"
