"""``netlab.Lab``: the Python API behind the CLI.

    from netlab import Lab
    lab = Lab.up("ambient-to-sidecar")          # topology name or path
    lab.exec_capture("sleep", ["curl", "-s", "http://httpbin.bar:8000/get"])
    lab.down()

A lab's truth lives in its state directory (``/run/netlab/<lab>/``): the plan it was built from
and the ledger of what was actually created. Everything here reads from there, so a lab brought
up by one process can be inspected or torn down by another, also after a crash.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from netlab.errors import KernelFeatureError, LabStateError, NetlabError, UsageError
from netlab.plan.types import Plan, PodInfo

Progress = Callable[[str, int, int], None]
_LAB_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def run_dir() -> Path:
    return Path(os.environ.get("NETLAB_RUN_DIR", "/run/netlab"))


def state_dir(lab: str) -> Path:
    return run_dir() / lab


def choose_tunnel(requested: str) -> Literal["kernel", "userspace"]:
    """``auto`` takes kernel Geneve when it really works here (probed in a scratch netns)."""
    if requested == "userspace":
        return "userspace"
    from netlab.geneve.kernel import kernel_geneve_supported

    ok = kernel_geneve_supported()
    if requested == "kernel" and not ok:
        raise KernelFeatureError("--tunnel kernel: this kernel has no geneve support (try --tunnel userspace, "
                                 "or scripts/vm-test for a kernel that has it)")
    return "kernel" if ok else "userspace"


class Lab:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    @property
    def name(self) -> str:
        return self.plan.lab

    @property
    def state_dir(self) -> Path:
        return state_dir(self.plan.lab)

    # ---- lifecycle ----
    @classmethod
    def up(cls, topology: str | os.PathLike[str], *, name: str | None = None, tunnel: str = "auto",
           progress: Progress | None = None, mesh: bool = True) -> "Lab":
        """Create the lab; on any failure, remove what was made and raise. ``mesh=False`` starts no
        proxies (every rule is still installed), for tests that listen where the proxies would."""
        from netlab.kernel import apply as kapply
        from netlab.plan.build import build_plan
        from netlab.topology.load import load_topology, resolve

        path = resolve(topology)
        topo = load_topology(path)
        lab = name or topo.name
        if not _LAB_NAME.match(lab):
            raise UsageError(f"lab name {lab!r}: use 1-40 lowercase letters, digits and '-'")
        if lab in cls.running():
            raise LabStateError(f"lab {lab!r} is already up (see `netlab status {lab}`, or `netlab down {lab}` first)")
        mode = choose_tunnel(tunnel)
        plan = build_plan(topo, lab=lab, tunnel=mode, source=str(path), mesh=mesh)
        try:
            kapply.apply(plan, progress=progress)  # rolls back on failure
        except kapply.ApplyError as e:
            raise NetlabError(f"lab {lab}: {e}") from None
        except FileExistsError as e:  # the ledger dir appeared meanwhile: another `up` of the same name
            raise LabStateError(f"lab {lab!r} is already up or being brought up ({e})") from None
        lab_obj = cls(plan)
        try:
            lab_obj._start_runtime(progress)
        except BaseException:
            cls.down_lab(lab)
            raise
        return lab_obj

    def _start_runtime(self, progress: Progress | None) -> None:
        procs: list[Any] = list(self.plan.processes)
        if any(p.kind in ("ztunnel", "sidecar", "waypoint") for p in procs):
            from netlab.mesh import bootstrap

            reg = bootstrap.prepare(self.plan, self.state_dir)
            procs = bootstrap.supervised(self.plan, self.state_dir, reg)
        if not procs:
            return
        from netlab.runtime.supervisor import start_supervisor

        if progress:
            progress("processes", 0, len(procs))
        start_supervisor(self.name, procs, str(self.state_dir), timeout=30.0 + 0.5 * len(procs))
        if progress:
            progress("processes", len(procs), len(procs))

    def down(self) -> str:
        return self.down_lab(self.name)

    @classmethod
    def down_lab(cls, lab: str) -> str:
        from netlab.kernel import destroy

        sd = state_dir(lab)
        if any((sd / f).exists() for f in ("supervisor.json", "procs.json", "spec.json")):
            from netlab.runtime.supervisor import stop_supervisor

            for _ in range(2):
                try:
                    stop_supervisor(str(sd))
                except Exception:  # noqa: BLE001 - the ledger-driven destroy below still kills what it recorded
                    pass
                # A supervisor launched by an `up` that was killed before the daemon wrote
                # supervisor.json (or procs.json) is not in any record: find it by its command line,
                # or it outlives `down` and recreates the state dir. Then look at the records again.
                if not _stop_stray_supervisors(sd):
                    break
        rep = destroy.destroy(lab)
        parts = [f"{len(rep.netns_deleted)} namespaces"]
        if rep.processes_stopped or rep.processes_killed:
            parts.append(f"{len(rep.processes_stopped) + len(rep.processes_killed)} processes")
        if rep.files_removed:
            parts.append(f"{len(rep.files_removed)} files")
        msg = "removed " + ", ".join(parts)
        if rep.errors:
            raise NetlabError(f"lab {lab}: {msg}, but: " + "; ".join(rep.errors))
        return msg

    # ---- finding labs ----
    @staticmethod
    def running() -> list[str]:
        from netlab.kernel import destroy

        return sorted(destroy.list_labs())

    @classmethod
    def resolve_name(cls, lab: str | None) -> str:
        labs = cls.running()
        if lab is not None:
            if lab not in labs:
                raise UsageError(f"no lab named {lab!r} is up" + (f" (up: {', '.join(labs)})" if labs else " (no lab is up)"))
            return lab
        if len(labs) == 1:
            return labs[0]
        if not labs:
            raise UsageError("no lab is up (netlab up <topology>)")
        raise UsageError(f"several labs are up ({', '.join(labs)}): say which with --lab")

    @classmethod
    def attach(cls, lab: str | None = None) -> "Lab":
        name = cls.resolve_name(lab)
        p = state_dir(name) / "plan.json"
        try:
            plan = Plan.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise LabStateError(f"lab {name!r} has no plan in {p} (a crashed `up`? run `netlab down {name}`)") from None
        return cls(plan)

    # ---- looking inside ----
    def status(self) -> dict[str, Any]:
        p = self.plan
        return {
            "lab": p.lab,
            "topology": p.topology,
            "tunnel": p.tunnel,
            "nodes": [{"name": n.name, "netns": n.netns, "ip": n.ip, "pod_cidr": n.pod_cidr} for n in p.nodes],
            "pods": [{"name": x.name, "namespace": x.namespace, "node": x.node, "netns": x.netns, "ip": x.ip,
                      "mode": x.mode} for x in p.pods],
            "services": [{"name": s.name, "namespace": s.namespace, "vip": s.vip, "port": s.port,
                          "target_port": s.target_port} for s in p.services],
        }

    def pod(self, ref: str) -> PodInfo:
        try:
            return self.plan.pod(ref)
        except KeyError as e:
            raise UsageError(str(e.args[0])) from None

    def netns_of(self, target: str) -> str:
        """A node name, a pod (``name`` or ``ns/name``), ``ztunnel:<node>`` or a full netns name."""
        if target.startswith("ztunnel:"):
            node = target.split(":", 1)[1]
            for x in self.plan.pods:
                if x.mode == "ztunnel" and x.node == node:
                    return x.netns
            raise UsageError(f"no ztunnel on node {node!r} in lab {self.name!r}")
        for n in self.plan.nodes:
            if n.name == target or n.netns == target:
                return n.netns
        if target in (x.name for x in self.plan.netns):
            return target
        return self.pod(target).netns

    def exec(self, pod: str, argv: Sequence[str]) -> None:
        """Replace this process with ``ip netns exec <pod netns> argv`` (gets the lab's /etc/hosts)."""
        netns = self.netns_of(pod)
        os.execvp("ip", ["ip", "netns", "exec", netns, *argv])

    def exec_capture(self, pod: str, argv: Sequence[str], timeout: float = 30.0,
                     check: bool = False) -> subprocess.CompletedProcess[str]:
        netns = self.netns_of(pod)
        return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def rules(self, target: str) -> dict[str, Any]:
        """Live datapath state of one namespace, read with the standard tools."""
        netns = self.netns_of(target)

        def run(*argv: str) -> str:
            r = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True)
            return r.stdout if r.returncode == 0 else f"({' '.join(argv)}: {r.stderr.strip()})"

        return {
            "target": target,
            "netns": netns,
            "iptables": run("iptables-legacy-save"),
            "ip rules": run("ip", "rule", "show"),
            "routes": run("ip", "route", "show", "table", "all"),
            "ipsets": run("ipset", "list"),
            "tunnels": _tunnels(run("ip", "-d", "link", "show")),
        }

    def stats(self) -> dict[str, Any]:
        """RSS and TCP connections per lab process, and proxy memory totals per node."""
        from netlab import stats

        pods = {x.ref: x for x in self.plan.pods}
        node_of = {pr.name: pods[pr.ref].node for pr in self.plan.processes if pr.ref in pods}
        node_of.update({pr.name: pr.name.removeprefix("geneve-").removeprefix("ztunnel-") for pr in self.plan.processes
                        if pr.kind == "geneve"})
        procs = stats.process_stats(self.state_dir, node_of)
        per_node: dict[str, dict[str, int]] = {}
        for s in procs:
            if s.kind in ("ztunnel", "sidecar", "waypoint"):
                n = per_node.setdefault(s.node, {"proxies": 0, "proxy_rss_kib": 0, "established": 0})
                n["proxies"] += 1
                n["proxy_rss_kib"] += s.rss_kib
                n["established"] += s.established
        return {"lab": self.name, "processes": stats.as_dicts(procs), "nodes": per_node}

    def connection_legs(self, component: str | None = None) -> list[dict[str, Any]]:
        """The proxies' connection legs (one per proxied connection), oldest first."""
        return self.connection_legs_counted(component)[0]

    def connection_legs_counted(self, component: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """(legs oldest first, lines skipped because they are no leg) of the proxies' logs."""
        from netlab.mesh.connlog import components, read_legs_counted

        legs: list[dict[str, Any]] = []
        skipped = 0
        for name, path in components(self.state_dir / "conn").items():
            if component in (None, name):
                got, bad = read_legs_counted(path)
                legs += got
                skipped += bad
        return sorted(legs, key=lambda leg: leg.get("start", 0)), skipped

    def logs(self, component: str | None, lines: int = 50, follow: bool = False) -> None:
        from netlab.runtime import logs

        names = sorted(p.name for p in self.plan.processes)
        if component is None:
            print("components: " + (", ".join(names) or "(none)"))
            return
        if component not in names:
            raise UsageError(f"no component {component!r} in lab {self.name!r} (components: {', '.join(names) or 'none'})")
        logs.tail(str(self.state_dir), component, lines, follow)


def _supervisors_of(sd: Path) -> list[tuple[int, int]]:
    """(pid, starttime) of live ``netlab.runtime.supervisor`` processes (launcher, intermediate
    fork or daemon: they share one command line) whose ``--state-dir`` is ``sd``."""
    from netlab.runtime import procfs

    want = {str(sd), str(sd.resolve())}
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode("utf-8", "replace") for a in argv]
        if "netlab.runtime.supervisor" not in args or "--state-dir" not in args:
            continue
        i = args.index("--state-dir")
        if i + 1 < len(args) and args[i + 1] in want:
            st = procfs.starttime(int(d.name))
            if st is not None and procfs.alive(int(d.name), st):
                out.append((int(d.name), st))
    return out


def _stop_stray_supervisors(sd: Path, rounds: int = 5) -> bool:
    """SIGTERM (then SIGKILL) every supervisor process of ``sd``; rescan, as one may have forked
    meanwhile. A daemon that gets SIGTERM stops its children itself. True if any was found."""
    from netlab.runtime import procfs

    found = False
    for _ in range(rounds):
        procs = _supervisors_of(sd)
        if not procs:
            break
        found = True
        procfs.terminate(procs, grace=5.0, group=False)
    return found


def _tunnels(link_text: str) -> str:
    """Keep the geneve and tap devices of `ip -d link show` output."""
    blocks = re.split(r"\n(?=\d+: )", link_text)
    keep = [b for b in blocks if re.search(r"\b(geneve|tun type tap|tun)\b", b) or "istio" in b]
    return "\n".join(keep) if keep else "(no tunnel devices)"


__all__ = ["Lab", "NetlabError", "choose_tunnel", "state_dir", "run_dir"]
