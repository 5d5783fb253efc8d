"""ztunnel 1.18 for the lab: one asyncio process per node, in that node's ztunnel netns.

Layout follows ztunnel's ``src/proxy/``: :mod:`.outbound` (15001), :mod:`.inbound` (HBONE 15008),
:mod:`.inbound_passthrough` (plaintext 15006), readiness on 15021 (the proxies' shared
:func:`netlab.mesh.process.serve_readiness`). Every routing decision lives in :mod:`.route` as
pure functions over the registry, so it is testable without root; the listener modules only
carry bytes and record one connection-log leg each (:class:`netlab.mesh.legs.LegRecorder`).
"""
