"""The one place a proxy records a connection leg (ztunnel's ``ConnectionResult.record``).

Every proxy (ztunnel, sidecar, waypoint) makes a :class:`~netlab.mesh.connlog.Leg` when it
accepts a connection, fills it in as it decides and connects, and records it exactly once when
the leg is over: refused, failed to connect, or relayed to its end. :class:`LegRecorder` is that
"once": it stamps the duration, turns a relay's result into the leg's bytes and outcome the same
way for every proxy, and never lets a failed log write (a full disk) take the datapath down.

HBONE servers relay on their own (:class:`~netlab.mesh.hbone.HboneServer`), so a handler that
accepts a CONNECT parks its leg (:meth:`LegRecorder.park`) and the server's ``on_relay_done``
(:meth:`LegRecorder.relay_done`) records it.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from netlab.mesh.connlog import Leg, addr
from netlab.mesh.endpoint import Endpoint
from netlab.mesh.hbone import ConnectRequest
from netlab.mesh.relay import OUTCOME_DOWNSTREAM_GONE, OUTCOME_OK, RelayResult, relay

log = logging.getLogger(__name__)


class LegWriter(Protocol):
    """Where legs go: a :class:`~netlab.mesh.connlog.ConnLog`, or a wrapper around one."""

    def write(self, leg: Leg) -> None: ...

    def close(self) -> None: ...


def relay_outcome(result: RelayResult) -> tuple[str, dict[str, str]]:
    """A relay's outcome as a leg's (outcome, extra): ``ok``; ``reset`` with which side reset it
    (``extra.reset``); ``downstream_gone`` when the client left before the relay started."""
    if result.outcome in (OUTCOME_OK, OUTCOME_DOWNSTREAM_GONE):
        return result.outcome, {}
    return "reset", {"reset": result.outcome}


def _note_upstream(leg: Leg, up: Endpoint) -> None:
    """The upstream connection's local address: the next proxy's downstream, the 4-tuple join key
    (read while the connection is up: it is gone from a closed transport)."""
    leg.up_src = addr(up.local_addr)


class LegRecorder:
    """One proxy component's legs: made with :meth:`start`, written once with :meth:`record`."""

    def __init__(self, component: str, writer: LegWriter) -> None:
        self.component = component
        self.writer = writer
        self._parked: dict[object, Leg] = {}  # HBONE: by stream (identity), until its relay is done

    def start(self, listener: str, src: Any, orig_dst: str, local: Any = None, **fields: Any) -> Leg:
        """A new leg; ``src`` and ``local`` are socket addresses (or None), ``orig_dst`` a string
        (an address or a CONNECT authority)."""
        return Leg(component=self.component, listener=listener, src=addr(src), orig_dst=orig_dst,
                   local=addr(local), **fields)

    def record(self, leg: Leg, outcome: str | None = None) -> None:
        """The leg is over: stamp its duration (and ``outcome``) and write it."""
        try:
            self.writer.write(leg.finish(outcome))
        except OSError as e:  # a full disk must not take the datapath down
            log.warning("connlog: %s", e)

    def relayed(self, leg: Leg, result: RelayResult) -> None:
        """Record a leg whose relay is over (bytes each way, how it ended)."""
        leg.bytes_up, leg.bytes_down = result.bytes_up, result.bytes_down
        outcome, extra = relay_outcome(result)
        leg.extra.update(extra)
        self.record(leg, outcome)

    async def relay(self, leg: Leg, down: Endpoint, up: Endpoint) -> None:
        """Relay ``down`` <-> ``up`` to the end, then record the leg."""
        _note_upstream(leg, up)
        self.relayed(leg, await relay(down, up))

    # ---- HBONE servers: the server runs the relay --------------------------------------------
    def park(self, req: ConnectRequest, leg: Leg, up: Endpoint) -> Endpoint:
        """A handler accepted a CONNECT with upstream ``up``: note it in the leg and hold the leg
        until the server reports the relay. Returns ``up`` (what the handler returns)."""
        _note_upstream(leg, up)
        if req.stream is not None:
            self._parked[req.stream] = leg
        return up

    def relay_done(self, req: ConnectRequest, result: RelayResult) -> None:
        """``HboneServer.on_relay_done``: record the leg parked for this stream."""
        leg = self._parked.pop(req.stream, None) if req.stream is not None else None
        if leg is not None:
            self.relayed(leg, result)

    def close(self) -> None:
        self.writer.close()
