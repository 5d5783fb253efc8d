"""What one ztunnel instance needs to know about itself (ztunnel ``config.rs``, reference §4.1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from netlab import istio

# Listener names as they appear in the connection log (component ``ztunnel-<node>``).
LISTENER_OUTBOUND = f"outbound:{istio.ZTUNNEL_OUTBOUND_PORT}"
LISTENER_INBOUND = f"inbound:{istio.HBONE_PORT}"
LISTENER_PLAINTEXT = f"inbound-plaintext:{istio.ZTUNNEL_INBOUND_PLAINTEXT_PORT}"


@dataclass(frozen=True)
class ZtunnelConfig:
    """One node's ztunnel: its node, its own pod IP (``INSTANCE_IP``) and its ports.

    ``transparent`` mirrors ztunnel's ``enable_original_source``: with it, listeners get
    IP_TRANSPARENT (TPROXY only delivers to such sockets) and upstream sockets spoof the
    client's IP. Tests that run without the lab's TPROXY rules may switch it off.
    """

    lab: str
    node: str
    own_ip: str
    bind: str = "0.0.0.0"
    outbound_port: int = istio.ZTUNNEL_OUTBOUND_PORT
    inbound_plaintext_port: int = istio.ZTUNNEL_INBOUND_PLAINTEXT_PORT
    inbound_port: int = istio.HBONE_PORT
    readiness_port: int = istio.READINESS_PORT
    hbone_port: int = istio.HBONE_PORT  # port dialled on peers (pods/waypoints)
    transparent: bool = True
    connect_timeout: float = istio.CONNECT_TIMEOUT_S
    #: the in-pod mode (datapath inpod): listeners inside each enrolled pod, handed over by
    #: istio-cni's node agent on this ZDS socket; ztunnel's own netns keeps readiness only
    zds: Path | None = None

    @property
    def inpod(self) -> bool:
        return self.zds is not None

    @property
    def component(self) -> str:
        return f"ztunnel-{self.node}"
