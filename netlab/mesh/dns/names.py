"""What the mesh's names resolve to: a Service's ``<name>.<namespace>.svc.cluster.local`` is its
VIP (from the registry istiod pushes), for both of the lab's DNS servers.

* kube-dns answers fully qualified names only (a client walks its ``search`` list itself);
* ztunnel's DNS proxy (ZDNS ``server.rs``) also knows the short forms a pod may use --
  ``<name>.<namespace>.svc``, ``<name>.<namespace>`` and, in the Service's own namespace,
  ``<name>`` -- and strips the asking pod's search domains off a name first, so the stub
  resolver's first try (``httpbin.bar.foo.svc.cluster.local`` from a pod in ``foo``) is
  answered at once instead of going upstream for an NXDOMAIN.
"""

from __future__ import annotations

from netlab import istio
from netlab.mesh.registry import Registry


def search_domains(namespace: str) -> tuple[str, ...]:
    d = istio.CLUSTER_DOMAIN
    return (f"{namespace}.svc.{d}", f"svc.{d}", d)


class ServiceNames:
    """Name -> VIPs of the registry's Services."""

    def __init__(self, reg: Registry) -> None:
        self.fqdn: dict[str, list[str]] = {}
        for s in reg.services.values():
            vips = self.fqdn.setdefault(s.hostname, [])
            if s.vip not in vips:
                vips.append(s.vip)

    def exact(self, name: str) -> list[str] | None:
        """kube-dns: a fully qualified Service name, else None."""
        return self.fqdn.get(name.lower().rstrip("."))

    def for_pod(self, name: str, namespace: str) -> list[str] | None:
        """ztunnel: ``name`` as a pod of ``namespace`` may write it, else None (not ours: forward)."""
        name = name.lower().rstrip(".")
        candidates = [name]
        for dom in search_domains(namespace):
            if name.endswith("." + dom):
                candidates.append(name[: -len(dom) - 1])
        d = istio.CLUSTER_DOMAIN
        for c in candidates:
            parts = c.split(".")
            if c.endswith(f".svc.{d}"):
                fq = c
            elif len(parts) == 3 and parts[2] == "svc":
                fq = f"{c}.{d}"
            elif len(parts) == 2:
                fq = f"{c}.svc.{d}"
            elif len(parts) == 1:
                fq = f"{c}.{namespace}.svc.{d}"
            else:
                continue
            if fq in self.fqdn:
                return self.fqdn[fq]
        return None
