"""ztunnel 1.18 for the lab: one asyncio process per node, in that node's ztunnel netns.

Layout follows ztunnel's ``src/proxy/``: :mod:`.outbound` (15001), :mod:`.inbound` (HBONE 15008),
:mod:`.inbound_passthrough` (plaintext 15006), :mod:`.readiness` (15021). Every routing decision
lives in :mod:`.route` as pure functions over the registry, so it is testable without root;
the listener modules only carry bytes and write one connection-log line per leg.
"""
