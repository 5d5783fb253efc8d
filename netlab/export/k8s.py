"""`netlab export k8s TOPOLOGY -o DIR`: write the scenario for a kind cluster with Istio.

Pure until the last step: the objects and scripts are computed from the validated topology and
its plan (``Plan.paths`` carries the hop contracts check.sh prints), then written. Writing is
careful because netlab is often run as root and DIR may be anywhere: DIR itself is opened with
O_NOFOLLOW, every file is written under a fresh temporary name in it (O_EXCL|O_NOFOLLOW) and
renamed over the final name, so a symlink planted in DIR is replaced, never followed. Only the
files listed in ``ExportResult.files`` are touched.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from netlab.errors import NetlabError, TopologyError, UsageError
from netlab.export import objects, scripts
from netlab.export.releases import Release, choose

#: `netlab export k8s --help`
EXPORT_K8S_HELP = """\
Write the topology's scenario for a real Kubernetes cluster with Istio, pinned to the release of
the datapath (istio-1.18: Istio 1.18.2; inpod: Istio 1.30.3), into DIR:

  k8s.yaml     Namespaces (with their labels), ServiceAccounts, one Deployment per pod pinned to
               its node (nodeSelector kubernetes.io/hostname), Services; built-in apps run the
               release's Istio sample images, pods with a `command` a placeholder image
  istio.yaml   waypoints as that release expects them, policies as AuthorizationPolicy
  kind.yaml    a kind cluster whose workers carry the topology's node names (kubernetes.io/hostname)
  install.sh   creates the cluster, installs Istio with the ambient profile, applies the objects
  check.sh     sends each path's request with kubectl exec and prints, per hop of the path's
               contract, the tcpdump command that shows it on that node
  README.md    what needs a network, what it reproduces, what differs from the lab

Exporting needs no root and no network; install.sh needs both docker and a network.
"""


@dataclass
class ExportResult:
    directory: str
    topology: str
    datapath: str
    istio: str
    kubernetes: str
    files: list[str] = field(default_factory=list)
    objects: dict[str, int] = field(default_factory=dict)  # kind -> count

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def render(topology: str | os.PathLike[str], datapath: str | None = None) -> tuple[Release, dict[str, bytes], ExportResult]:
    """Everything the export writes, as file name -> bytes (no I/O but reading the topology)."""
    from netlab.plan.build import build_plan
    from netlab.topology.load import load_topology, resolve

    path = resolve(topology)
    topo = load_topology(path)
    try:
        rel = choose(datapath, topo)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    try:
        m = objects.build(topo, rel)
        plan = build_plan(topo, source=str(path))
        check = scripts.check_sh(plan, rel)
    except objects.ExportError as e:
        raise TopologyError(f"{path}: {e}") from None
    files: dict[str, bytes] = {
        "k8s.yaml": _yaml_docs(m.core, f"netlab export k8s {topo.name} --datapath {rel.datapath}: Kubernetes {rel.kubernetes}"),
        "istio.yaml": _yaml_docs(m.istio, f"netlab export k8s {topo.name} --datapath {rel.datapath}: Istio {rel.istio}"),
        "kind.yaml": _yaml_docs([scripts.kind_config(topo)], "kind create cluster --config kind.yaml (install.sh does)"),
        "install.sh": scripts.install_sh(topo, rel, m).encode(),
        "check.sh": check.encode(),
        "README.md": scripts.readme(topo, rel, m).encode(),
    }
    if m.own_programs:
        files["program-image/Dockerfile"] = scripts.dockerfile().encode()
    counts: dict[str, int] = {}
    for o in m.core + m.istio:
        counts[o["kind"]] = counts.get(o["kind"], 0) + 1
    res = ExportResult(directory="", topology=topo.name, datapath=rel.datapath, istio=rel.istio,
                       kubernetes=rel.kubernetes, files=sorted(files), objects=counts)
    return rel, files, res


def export_k8s(topology: str | os.PathLike[str], out_dir: str | os.PathLike[str], datapath: str | None = None) -> ExportResult:
    _, files, res = render(topology, datapath)
    res.directory = str(out_dir)
    try:
        _write_all(Path(out_dir), files)
    except OSError as e:
        where = e.filename or out_dir
        hint = " (a symlink? the export does not follow links)" if e.errno == errno.ELOOP else ""
        raise NetlabError(f"export to {out_dir}: {where}: {e.strerror}{hint}") from None
    return res


def _yaml_docs(docs: list[dict[str, Any]], title: str) -> bytes:
    body = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False) if docs else ""
    return (f"# {title}\n" + body).encode()


def _write_all(out: Path, files: dict[str, bytes]) -> None:
    try:
        os.mkdir(out, 0o755)
    except FileExistsError:
        pass
    dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name, data in files.items():
            sub, _, base = name.rpartition("/")
            fd = dfd
            if sub:
                try:
                    os.mkdir(sub, 0o755, dir_fd=dfd)
                except FileExistsError:
                    pass
                fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                _write_one(fd, base, data, 0o755 if base.endswith(".sh") else 0o644)
            finally:
                if fd != dfd:
                    os.close(fd)
    finally:
        os.close(dfd)


def _write_one(dfd: int, name: str, data: bytes, mode: int) -> None:
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode, dir_fd=dfd)  # not left to the umask
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
