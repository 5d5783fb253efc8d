"""``python -m netlab.mesh.kubedns --lab LAB``: the lab's kube-dns stand-in (datapath inpod with DNS
capture; docs/deviations.md, "inpod").

It runs in the pod ``kube-system/kube-dns`` behind the Service of that name, which every pod's
``resolv.conf`` names, and answers a Service's fully qualified name
(``<name>.<namespace>.svc.cluster.local``) with its VIP, from the lab's registry. A pod not
enrolled in ambient (plain, sidecar) asks it through the node's kube-proxy DNAT; ztunnel forwards
it what it does not answer itself. Other names in ``cluster.local`` get NXDOMAIN; names outside it
get SERVFAIL (the lab has no upstream: no packet leaves its namespaces).
"""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass
from typing import Any

from netlab import istio
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.dns import codec
from netlab.mesh.dns.names import ServiceNames
from netlab.mesh.dns.server import DnsServer
from netlab.mesh.process import run_proxy
from netlab.mesh.sockets import listener


@dataclass
class KubeDns:
    names: ServiceNames
    server: DnsServer | None = None
    port: int = istio.DNS_PORT

    @property
    def ready_fields(self) -> dict[str, Any]:
        return {"app": istio.KUBE_DNS_NAME, "name": f"{istio.KUBE_DNS_NAME}.{istio.KUBE_SYSTEM_NS}",
                "port": self.port, "names": len(self.names.fqdn)}

    async def resolve(self, data: bytes, _peer: str) -> bytes | None:
        try:
            q = codec.parse_query(data)
        except codec.DnsFormatError:
            return codec.error_for(data, codec.FORMERR)
        ips = self.names.exact(q.name)
        if ips is not None:
            return codec.response(q, ips)
        inside = q.name == istio.CLUSTER_DOMAIN or q.name.endswith("." + istio.CLUSTER_DOMAIN)
        return codec.error(q, codec.NXDOMAIN if inside else codec.SERVFAIL)

    async def start(self, host: str = "0.0.0.0") -> KubeDns:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, self.port))
        self.server = await DnsServer(self.resolve).start(udp, listener(host, self.port))
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


def main(argv: list[str] | None = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--lab", required=True)

    async def start(args: argparse.Namespace, _p: argparse.ArgumentParser) -> KubeDns:
        return await KubeDns(ServiceNames(MeshContext.for_lab(args.lab).registry)).start()

    return run_proxy(argv, prog="netlab.mesh.kubedns", description=__doc__ or "", add_arguments=arguments,
                     start=start, log_name=lambda a: "kube-dns")


if __name__ == "__main__":
    sys.exit(main())
