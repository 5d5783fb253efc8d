"""What a proxy process of a lab needs at start: the registry, the trust root, its certificates.

``Lab.up`` prepares it all in the lab's state directory before any proxy starts (istiod's job):
``registry.json`` and a CA under ``ca/`` with a leaf for every identity the lab has, and each
proxy's connection-log files in ``conn/`` (root's directory; a sidecar's files belong to uid
1337). Proxies only read files, so a sidecar running as uid 1337 never needs the CA key; what
it sees of the state directory at all is its own view (:func:`sidecar_view`): the registry,
the CA certificate, its own certificate and key, its own connection log.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netlab import istio, state
from netlab.mesh import connlog
from netlab.mesh.registry import Registry, build_registry
from netlab.names import cert_dir_name

REGISTRY_FILE = state.REGISTRY
if TYPE_CHECKING:
    from netlab.plan.types import Plan, Process

CA_DIR = state.CA
CERTS_DIR = state.CA_CERTS
CONN_LOG_DIR = state.CONN
PROXY_KINDS = ("ztunnel", "sidecar", "waypoint")


def ztunnel_identity(trust_domain: str = istio.TRUST_DOMAIN) -> str:
    return istio.spiffe_id(istio.ISTIO_SYSTEM_NS, istio.ZTUNNEL_SA, trust_domain)


def prepare(plan: Plan, state_dir: str | os.PathLike[str]) -> Registry:
    """istiod's part of ``up``: write the registry, create the CA, issue every identity's leaf."""
    from netlab.mesh.ca import LabCA  # (cryptography: ~35 ms of a sidecar's cold start, which only reads PEMs)

    sd = Path(state_dir)
    reg = build_registry(plan)
    (sd / REGISTRY_FILE).write_text(reg.to_json())
    ca = LabCA.open(sd / CA_DIR, trust_domain=reg.trust_domain)
    os.chmod(ca.ca_cert_path, 0o644)
    identities = {ztunnel_identity(reg.trust_domain)} | {w.identity for w in reg.workloads.values()}
    for ident in sorted(identities):
        ca.issue(ident)
    # sidecars run as 1337:1337 (§6) and read their own key; nothing else is theirs
    for w in reg.workloads.values():
        if w.mode == "sidecar":
            cert, key = ca.issue(w.identity)
            for p in (cert.parent, cert, key):
                os.chown(p, istio.PROXY_UID, istio.PROXY_GID)
    conn = _root_dir(sd / CONN_LOG_DIR)  # nobody but root may create or rename anything here
    for proc in plan.processes:
        if proc.kind in PROXY_KINDS:
            connlog.prepare(conn / f"{proc.name}{state.CONN_SUFFIX}", proc.uid, proc.gid)
    for d in (sd, sd / CA_DIR, sd / CA_DIR / CERTS_DIR):
        os.chmod(d, 0o755)
    return reg


def _root_dir(d: Path) -> Path:
    """``d`` as a directory of root's, mode 0755 (made here, or checked: no symlink, no other owner)."""
    try:
        d.mkdir(mode=0o755)
    except FileExistsError:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(f"{d}: not a directory of ours; not writing into it") from None
    os.chmod(d, 0o755)
    return d


def sidecar_view(reg: Registry, state_dir: str | os.PathLike[str], proc: Process) -> dict[str, list[str]]:
    """What a sidecar process sees of the labs' state (``netlab.runtime.mountview``): nothing of
    any lab's directory but its registry and CA certificate, its own certificate directory
    (read-only) and its own connection-log files (writable). Every sidecar runs as uid 1337:
    without this each could read every other's key, of this lab and of any other."""
    sd = Path(state_dir).resolve()
    ctx = MeshContext(state_dir=sd, registry=reg)
    me = reg.pod(proc.ref)
    if me is None:  # the plan's sidecar processes are the registry's sidecar pods: a bug if not
        raise KeyError(f"no workload for sidecar {proc.ref} in the registry")
    cert, _key = ctx.cert_for(me.identity)
    runs = sd.parent if len(sd.parent.parts) > 2 else sd  # never a tmpfs over / or /run
    return {"hide": [str(runs)],
            "expose": [str(sd / REGISTRY_FILE), str(ctx.ca_cert), str(cert.parent)],
            "expose_rw": [str(f) for f in connlog.files_of(ctx.conn_log_path(proc.name))]}


def supervised(plan: Plan, state_dir: str | os.PathLike[str], reg: Registry) -> list[dict[str, Any]]:
    """The plan's processes as the supervisor's spec dicts, sidecars with their view."""
    out = []
    for p in plan.processes:
        d = asdict(p)
        if p.kind == "sidecar":
            d.update(sidecar_view(reg, state_dir, p))
        out.append(d)
    return out


@dataclass
class MeshContext:
    """A proxy's view of its lab, loaded from the state directory."""

    state_dir: Path
    registry: Registry

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> MeshContext:
        sd = Path(state_dir)
        return cls(state_dir=sd, registry=Registry.load(sd / REGISTRY_FILE))

    @classmethod
    def for_lab(cls, lab: str) -> MeshContext:
        from netlab.state import lab_dir as state_dir

        return cls.load(state_dir(lab))

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / CA_DIR / "ca-cert.pem"

    def cert_for(self, identity: str) -> tuple[Path, Path]:
        """(cert, key) of an identity issued at ``up`` (the directory ``LabCA.leaf_dir`` names)."""
        leaf = self.state_dir / CA_DIR / CERTS_DIR / cert_dir_name(identity)
        cert, key = leaf / "cert.pem", leaf / "key.pem"
        if not cert.exists():
            raise FileNotFoundError(f"no certificate issued for {identity} (expected {cert})")
        return cert, key

    def conn_log_path(self, component: str) -> Path:
        return state.StateDir(self.state_dir).conn_log(component)
