"""``netlab.Lab``: the Python API behind the CLI.

    from netlab import Lab
    lab = Lab.up("ambient-to-sidecar")          # topology name or path
    lab.exec_capture("sleep", ["curl", "-s", "http://httpbin.bar:8000/get"])
    lab.down()

A lab's truth lives in its state directory (``/run/netlab/<lab>/``, :mod:`netlab.state`): the
plan it was built from and the ledger of what was actually created. Everything here reads from
there, so a lab brought up by one process can be inspected or torn down by another, also after a
crash.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from netlab import testhooks
from netlab.errors import KernelFeatureError, LabStateError, NetlabError, UsageError
from netlab.kernel import ledger
from netlab.names import BadName, check_lab_name
from netlab.plan.types import Plan, PodInfo
from netlab.state import ConnLeg, StateDir
from netlab.state import lab_dir as state_dir  # the API's name for a lab's state directory

if TYPE_CHECKING:
    from netlab.runtime.supervisor import EarlySupervisor

Progress = Callable[[str, int, int], None]


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

    @property
    def files(self) -> StateDir:
        """The paths of the lab's state directory."""
        return StateDir(self.state_dir)

    # ---- lifecycle ----
    @classmethod
    def up(cls, topology: str | os.PathLike[str], *, name: str | None = None, tunnel: str = "auto",
           progress: Progress | None = None, mesh: bool = True, datapath: str | None = None) -> Lab:
        """Create the lab; on any failure, remove what was made and raise. ``mesh=False`` starts no
        proxies (every rule is still installed), for tests that listen where the proxies would.
        ``datapath`` (istio-1.18 | inpod) overrides the topology's ``datapath`` key."""
        from netlab.kernel import apply as kapply
        from netlab.plan.build import build_plan
        from netlab.topology.load import load_topology, resolve

        path = resolve(topology)
        topo = load_topology(path)
        lab = topo.name if name is None else name  # an empty --name is an error, not the topology's name
        try:
            check_lab_name(lab)
        except BadName as e:
            raise UsageError(str(e)) from None
        if lab in cls.running():
            raise LabStateError(f"lab {lab!r} is already up, or being brought up or taken down "
                                f"(see `netlab status {lab}`, or `netlab down {lab}` first)")
        from netlab import istio

        inpod = (datapath or topo.datapath) == istio.DATAPATH_INPOD
        # the in-pod datapath has no Geneve tunnel: nothing to probe (the plan records "userspace")
        mode = choose_tunnel(tunnel) if not inpod else "userspace"
        plan = build_plan(topo, lab=lab, tunnel=mode, source=str(path), mesh=mesh, datapath=datapath)
        early = _early_supervisor(plan)
        try:
            # the lab stays locked (`down` refuses it) until its processes run or it is rolled back
            kapply.apply(plan, progress=progress, keep_lock=True)
        except BaseException as e:
            if early is not None:
                early.cancel()
            if isinstance(e, kapply.ApplyError):
                raise NetlabError(f"lab {lab}: {e}") from None
            if isinstance(e, FileExistsError):  # the ledger dir appeared meanwhile: another `up` of the same name
                raise LabStateError(f"lab {lab!r} is already up or being brought up ({e})") from None
            raise
        lab_obj = cls(plan)
        try:
            lab_obj._start_runtime(progress, early=early)
        except BaseException as e:
            if early is not None:
                early.cancel()  # (a no-op once it was told to go)
            cls.down_lab(lab)
            if isinstance(e, Exception) and not isinstance(e, NetlabError):  # (the supervisor's, named)
                raise NetlabError(f"lab {lab}: {e}; rolled back") from e
            raise
        finally:
            ledger.release_lock(lab)
        return lab_obj

    @classmethod
    def repair(cls, lab: str, progress: Progress | None = None) -> tuple[Lab, list[str]]:
        """Restart a running lab's processes under a new supervisor, touching no kernel object:
        for a supervisor that died (SIGKILL, OOM) and took its processes with it. Returns the lab
        and what was wrong (empty: nothing was, and nothing was restarted)."""
        from netlab.kernel import destroy
        from netlab.runtime.supervisor import stop_supervisor

        obj = cls.attach(lab)
        problems = obj.health()["problems"]
        if not problems:
            return obj, []
        missing = [p for p in problems if p.startswith("netns")]
        if missing or not destroy.lab_is_up(obj.name):
            what = missing[0] if missing else "its kernel objects are not all there"
            raise LabStateError(f"lab {obj.name!r}: {what}; --repair restarts processes only: "
                                f"`netlab down {obj.name}`, then `netlab up` again")
        ledger.take_lock(obj.name)  # `down` and a second repair refuse meanwhile
        try:
            sd = obj.state_dir
            stop_supervisor(sd)  # a live one (restarting in a loop), and any process it left
            _stop_stray_supervisors(sd)
            try:
                obj._start_runtime(progress, bootstrap=False)
            except NetlabError:
                raise
            except Exception as e:
                raise NetlabError(f"lab {obj.name}: repair failed: {e}") from e
        finally:
            ledger.release_lock(obj.name)
        return obj, problems

    def _start_runtime(self, progress: Progress | None, bootstrap: bool = True,
                       early: EarlySupervisor | None = None) -> None:
        procs: list[Any] = list(self.plan.processes)
        if any(p.kind in ("ztunnel", "sidecar", "waypoint", "nodeagent") for p in procs):
            from netlab.mesh import bootstrap as mesh_bootstrap

            # a repair keeps the registry, CA and connection-log files `up` made
            reg = (mesh_bootstrap.prepare(self.plan, self.state_dir) if bootstrap
                   else mesh_bootstrap.MeshContext.load(self.state_dir).registry)
            procs = mesh_bootstrap.supervised(self.plan, self.state_dir, reg)
        if not procs:
            if early is not None:
                early.cancel()
            return
        from netlab.runtime.supervisor import start_supervisor

        if testhooks.ARMED:
            testhooks.point("runtime")
        if progress:
            progress("processes", 0, len(procs))
        start_supervisor(self.name, procs, str(self.state_dir), timeout=30.0 + 0.5 * len(procs), early=early)
        if progress:
            progress("processes", len(procs), len(procs))

    def down(self) -> str:
        return self.down_lab(self.name)

    @classmethod
    def down_lab(cls, lab: str) -> str:
        """Remove everything ``lab`` made. Never stops at one object: what could not be removed
        is listed in the NetlabError raised at the end (run it again once that is fixed)."""
        from netlab.kernel import destroy

        busy = ledger.locked_by(lab)
        if busy:
            raise ledger.LabBusyError(f"lab {lab!r} is being brought up or repaired by pid {busy}; wait for it "
                                      f"to finish (or stop it), then run `netlab down {lab}`")
        sd = state_dir(lab)
        if StateDir(sd).has_supervisor_files():
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
        if testhooks.ARMED:
            testhooks.point("down")
        rep = destroy.destroy(lab)
        parts = [f"{len(rep.netns_deleted)} namespaces"]
        if rep.processes_stopped or rep.processes_killed:
            parts.append(f"{len(rep.processes_stopped) + len(rep.processes_killed)} processes")
        if rep.files_removed:
            parts.append(f"{len(rep.files_removed)} files")
        msg = "removed " + ", ".join(parts)
        if rep.kept:
            msg += "; left in place, as this lab did not make them: " + "; ".join(rep.kept)
        if rep.errors:
            raise NetlabError(f"lab {lab}: {msg}; could not remove: " + "; ".join(rep.errors)
                              + f" (the rest is gone; `netlab down {lab}` again finishes the job)")
        return msg

    # ---- finding labs ----
    @staticmethod
    def running() -> list[str]:
        """Every lab with a state directory: up, being brought up or down, or left broken."""
        from netlab.kernel import destroy

        return sorted(destroy.list_labs())

    @classmethod
    def resolve_name(cls, lab: str | None) -> str:
        labs = cls.running()
        if lab is not None:
            if lab not in labs:
                raise UsageError(f"no lab named {lab!r} is up" + (f" (up: {', '.join(labs)})" if labs else " (no lab is up)"))
            return lab
        usable, broken = [], []
        for n in labs:  # only labs whose state reads: a broken one is named, never in the way
            try:
                ledger.read_plan(n)
                usable.append(n)
            except LabStateError:
                broken.append(n)
        note = f" (not counting {', '.join(broken)}: no readable state; `netlab down` it)" if broken else ""
        if len(usable) == 1:
            return usable[0]
        if not usable:
            raise UsageError("no lab is up (netlab up <topology>)" + note)
        raise UsageError(f"several labs are up ({', '.join(usable)}): say which with --lab" + note)

    @classmethod
    def attach(cls, lab: str | None = None) -> Lab:
        return cls(ledger.read_plan(cls.resolve_name(lab)))

    # ---- looking inside ----
    def health(self) -> dict[str, Any]:
        """Whether the lab still runs as `up` left it: ``health`` is ``up``, ``starting`` (an `up`
        or `up --repair` holds it) or ``degraded``, with ``problems`` saying why; each process's
        ``state`` (running, restarting: its supervisor is bringing it back, dead: nobody will)
        and last pid. A supervisor killed (SIGKILL, OOM) takes its processes with it and nothing
        restarts them: this is where that shows, and ``netlab up --repair`` is the remedy."""
        from netlab import netns as ns
        from netlab.runtime.supervisor import status as supervisor_status

        try:
            st = supervisor_status(self.state_dir)
        except (OSError, ValueError, AttributeError):  # unreadable records: as if none
            st = {"supervisor": {"pid": None, "alive": False}, "procs": {}}
        sup = st["supervisor"]
        problems: list[str] = []
        if self.plan.processes and not sup["alive"]:
            problems.append(f"supervisor (pid {sup['pid']}) is dead" if sup.get("pid") else "no supervisor")
        procs = []
        unwell: dict[str, list[str]] = {"dead": [], "restarting": []}
        for pr in self.plan.processes:
            rec = st["procs"].get(pr.name) or {}
            if rec.get("alive") and rec.get("state") == "running":
                state = "running"
            elif sup["alive"] and rec.get("state") not in ("stopped", "stopping"):
                state = "restarting"
            else:
                state = "dead"
            if state != "running":
                unwell[state].append(pr.name)
            procs.append({"name": pr.name, "kind": pr.kind, "state": state, "pid": rec.get("pid"),
                          "restarts": rec.get("restarts", 0), "last_exit": rec.get("last_exit")})
        problems += [f"{state}: {', '.join(names)}" for state, names in unwell.items() if names]
        existing = set(ns.list_netns())
        missing = [n.name for n in self.plan.netns if n.name not in existing]
        if missing:
            more = f" (and {len(missing) - 1} more)" if missing[1:] else ""
            problems.append(f"netns {missing[0]} is missing{more}")
        health = "starting" if ledger.locked_by(self.name) else ("degraded" if problems else "up")
        return {"health": health, "problems": problems,
                "supervisor": {"pid": sup.get("pid"), "state": "running" if sup["alive"] else "dead"},
                "processes": procs}

    def probe_states(self) -> dict[str, dict[str, Any]]:
        """Per pod with probes: ``ready`` / ``live`` (bool: as the node's kubelet stand-in last
        judged) and ``probes`` (each probe's last result), from the kubelets' status files."""
        from netlab.mesh.kubelet import read_status

        out: dict[str, dict[str, Any]] = {}
        for n in self.plan.nodes:
            for pr in read_status(self.files, n.name):
                d = out.setdefault(pr["pod"], {"probes": []})
                d["ready" if pr["kind"] == "readiness" else "live"] = bool(pr["passing"])
                d["probes"].append({k: pr.get(k) for k in ("kind", "port", "path", "passing", "failures", "last")})
        return out

    def status(self) -> dict[str, Any]:
        p = self.plan
        probes = self.probe_states()
        health = self.health()
        running = {pr["name"] for pr in health["processes"] if pr["state"] == "running"}

        def unprobed(ref: str) -> dict[str, Any]:
            """Without a readiness probe a pod is ready when its processes (app, sidecar, proxy) run,
            as a Kubernetes pod is when its containers do; the kubelet's verdict overrides it."""
            return {"ready": all(pr.name in running for pr in p.processes if pr.ref == ref)}
        return {
            "lab": p.lab,
            "topology": p.topology,
            "datapath": p.datapath,
            "tunnel": p.tunnel,
            **health,
            "nodes": [{"name": n.name, "netns": n.netns, "ip": n.ip, "pod_cidr": n.pod_cidr} for n in p.nodes],
            "pods": [{"name": x.name, "namespace": x.namespace, "node": x.node, "netns": x.netns, "ip": x.ip,
                      "mode": x.mode, **unprobed(x.ref), **probes.get(x.ref, {})} for x in p.pods],
            "services": [{"name": s.name, "namespace": s.namespace, "vip": s.vip, "port": s.port,
                          "target_port": s.target_port} for s in p.services],
        }

    def label(self, target: str, assignment: str) -> dict[str, Any]:
        """``netlab label``: set (``KEY=VALUE``) or remove (``KEY-``) a label of ``namespace/NS``
        or ``pod/NS/NAME`` live, doing what istio-cni and istiod do about it, no process restarted
        (:mod:`netlab.mesh.relabel`). Returns what changed; ``self.plan`` is the new plan."""
        from netlab.mesh.relabel import relabel
        from netlab.plan.relabel import parse_change

        res = relabel(self.name, parse_change(target, assignment))
        self.plan = ledger.read_plan(self.name)
        return res

    def waypoint(self, op: str, namespace: str, *, name: str = "waypoint", node: str | None = None) -> dict[str, Any]:
        """``netlab waypoint add|rm``: a waypoint of ``namespace`` made or removed live, no other
        process restarted (:mod:`netlab.mesh.livewaypoint`). ``self.plan`` is the new plan."""
        from netlab.mesh.livewaypoint import WaypointChange, change_waypoint

        if op not in ("add", "rm"):
            raise UsageError(f"waypoint {op!r}: use add or rm")
        res = change_waypoint(self.name, WaypointChange(op, namespace, name, node if op == "add" else None))  # type: ignore[arg-type]
        self.plan = ledger.read_plan(self.name)
        return res

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

    def connection_legs(self, component: str | None = None) -> list[ConnLeg]:
        """The proxies' connection legs (one per proxied connection), oldest first."""
        return self.connection_legs_counted(component)[0]

    def connection_legs_counted(self, component: str | None = None) -> tuple[list[ConnLeg], int]:
        """(legs oldest first, lines skipped because they are no leg) of the proxies' logs."""
        from netlab.mesh.connlog import read_legs_counted

        legs: list[ConnLeg] = []
        skipped = 0
        for name, path in self.files.conn_logs().items():
            if component in (None, name):
                got, bad = read_legs_counted(path)
                legs += map(ConnLeg.from_dict, got)
                skipped += bad
        return sorted(legs, key=lambda leg: leg.start), skipped

    def components(self) -> list[str]:
        """The names of the lab's processes (what `netlab logs` takes), sorted."""
        return sorted(p.name for p in self.plan.processes)

    def logs(self, component: str, lines: int = 50, follow: bool = False) -> Iterator[str]:
        """The last ``lines`` lines of a process's output; with ``follow``, then every new line
        as it is written (until the caller stops iterating)."""
        from netlab.runtime import logs

        names = self.components()
        if component not in names:
            raise UsageError(f"no component {component!r} in lab {self.name!r} (components: {', '.join(names) or 'none'})")
        if not follow and not self.files.log(component).exists():
            raise LabStateError(f"{component} of lab {self.name!r} has no log yet ({self.files.log(component)})")
        return logs.tail(self.state_dir, component, lines, follow)


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


def _early_supervisor(plan: Plan) -> EarlySupervisor | None:
    """The lab's supervisor, started before the kernel apply so that its start-up and imports
    overlap it (see EarlySupervisor); None for a lab without processes, or with fork-spawn off."""
    if not plan.processes:
        return None
    from dataclasses import asdict

    from netlab.runtime import forkspawn
    from netlab.runtime.spawn import ProcSpec
    from netlab.runtime.supervisor import EarlySupervisor

    if not forkspawn.enabled():
        return None
    mods = [p.argv[0] for p in plan.processes if forkspawn.eligible(ProcSpec.from_any(asdict(p)))]
    return EarlySupervisor(plan.lab, state_dir(plan.lab), mods)


__all__ = ["Lab", "NetlabError", "choose_tunnel", "state_dir"]
