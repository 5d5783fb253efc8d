"""`netlab` command line: a thin shell over :class:`netlab.lab.Lab`.

Every failure the user can cause ends as one line on stderr and a non-zero status (2 for bad
input, 1 for wrong lab state, 3 for a missing kernel feature). Anything else is a bug: one line
too, exit 1, and the traceback only with ``--debug`` (a hostile file must not be able to print
thousands of lines into someone's terminal or log).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from netlab.cli import seeing, waypoint
from netlab.errors import NetlabError, UsageError

EPILOG = """\
examples:
  sudo netlab up ambient-to-sidecar            # bring up the seed's first scenario
  sudo netlab exec sleep -- curl -s http://httpbin.bar:8000/headers
  sudo netlab status --json | jq .pods
  sudo netlab rules node-a                      # live iptables/ip rules/routes/ipsets on node-a
  sudo ip netns exec ambient-to-sidecar-node-a ip rule   # every lab netns is an `ip netns` name
  sudo netlab down ambient-to-sidecar

topologies are YAML files in topologies/ (see `netlab list`) or any path.
"""


def _progress_printer(quiet: bool) -> Any:
    if quiet:
        return None
    tty = sys.stderr.isatty()
    finished: set[str] = set()  # not a terminal (a log): one line per stage, when it completes

    def show(stage: str, done: int, total: int) -> None:
        line = f"  {stage:<16} {done}/{total}"
        if tty:
            sys.stderr.write("\r" + line.ljust(40))
            if done == total:
                sys.stderr.write("\n")
        elif done == total and stage not in finished:
            finished.add(stage)
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


def cmd_up(a: argparse.Namespace) -> int:
    from netlab.child_setup import low_nofile_warning
    from netlab.lab import Lab

    t0 = time.monotonic()
    if a.repair:
        return _repair(a, t0)
    if not a.quiet:
        print(f"netlab: bringing up {a.topology}" + (f" as {a.name}" if a.name else ""), file=sys.stderr)
    if warning := low_nofile_warning():
        print(f"netlab: warning: {warning}", file=sys.stderr)
    lab = Lab.up(a.topology, name=a.name, tunnel=a.tunnel, progress=_progress_printer(a.quiet), datapath=a.datapath)
    st = lab.status()
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    p = lab.plan
    print(f"lab {p.lab} is up in {time.monotonic() - t0:.1f}s: {len(p.nodes)} nodes, {len(p.pods)} pods, "
          f"{len(p.services)} services, datapath={p.datapath}" + (f", tunnel={p.tunnel}" if p.datapath != "inpod" else ""))
    _print_status(st)
    print(f"\nnext: netlab exec --lab {p.lab} <pod> -- curl -s http://<svc>.<ns>:<port>/   |   netlab down {p.lab}")
    return 0


def _repair(a: argparse.Namespace, t0: float) -> int:
    from netlab.lab import Lab

    if a.name or a.tunnel != "auto" or a.datapath:
        raise UsageError("netlab up --repair LAB: give the lab's name only (no --name, --tunnel, --datapath)")
    lab, problems = Lab.repair(a.topology, progress=_progress_printer(a.quiet))
    st = lab.status()
    if a.json:
        print(json.dumps(st, indent=2))
    elif not problems:
        print(f"lab {lab.name}: every process is running; nothing to repair")
    else:
        print(f"lab {lab.name} repaired in {time.monotonic() - t0:.1f}s (was: {'; '.join(problems)}); "
              f"now {st['health']}")
        _print_processes(st)
    return 0 if st["health"] == "up" else 1


def cmd_down(a: argparse.Namespace) -> int:
    from netlab.lab import Lab

    labs = Lab.running()
    if a.all:
        names = labs
    elif a.lab is None and len(labs) == 1:
        names = labs  # the one lab there is, up or left broken
    else:
        names = [Lab.resolve_name(a.lab)]
    if not names:
        print("netlab: no lab is up", file=sys.stderr)
        return 0
    failed = 0
    for n in names:  # one lab that cannot be removed does not keep the others
        try:
            rep = Lab.down_lab(n)
        except NetlabError as e:
            if len(names) == 1:
                raise
            print(f"netlab down: {e}", file=sys.stderr)
            failed = max(failed, e.exit_code)
            continue
        print(f"lab {n} is down" + (f" ({rep})" if rep else ""))
    return failed


def _print_processes(st: dict[str, Any]) -> None:
    if not st.get("processes"):
        return
    print(f"\n{'PROCESS':<34} {'KIND':<9} {'STATE':<11} {'PID':>7} {'RESTARTS':>8}")
    for p in st["processes"]:
        print(f"{p['name']:<34} {p['kind']:<9} {p['state']:<11} {p['pid'] or '-':>7} {p['restarts']:>8}")


def _print_status(st: dict[str, Any]) -> None:
    print(f"{'NODE':<14} {'NETNS':<36} IP")
    for n in st["nodes"]:
        print(f"{n['name']:<14} {n['netns']:<36} {n['ip']}")
    print(f"\n{'POD':<30} {'MODE':<9} {'READY':<6} {'NODE':<10} {'IP':<14} NETNS")
    for p in st["pods"]:
        ready = ("-" if "ready" not in p else "yes" if p["ready"] else "no") + ("!" if p.get("live") is False else "")  # (! liveness)
        print(f"{p['namespace'] + '/' + p['name']:<30} {p['mode']:<9} {ready:<6} {p['node']:<10} {p['ip']:<14} {p['netns']}")
    if st["services"]:
        print(f"\n{'SERVICE':<30} {'VIP':<14} PORT")
        for s in st["services"]:
            print(f"{s['namespace'] + '/' + s['name']:<30} {s['vip']:<14} {s['port']}->{s['target_port']}")


def cmd_status(a: argparse.Namespace) -> int:
    from netlab.lab import Lab

    if a.lab is None and not Lab.running():
        if a.json:
            print("[]")
            return 0
        print("no lab is up (netlab up <topology>)")
        return 0
    st = Lab.attach(a.lab).status()
    if a.json:
        print(json.dumps(st, indent=2))
    else:
        print(f"lab {st['lab']} (topology {st['topology']}, datapath {st['datapath']}, tunnel {st['tunnel']}): {st['health']}")
        for problem in st["problems"]:
            print(f"  {problem}")
        _print_status(st)
        _print_processes(st)
        if st["health"] == "degraded":
            print(f"\nrepair: netlab up --repair {st['lab']}   (restarts its processes; namespaces untouched)")
    return 0


def cmd_label(a: argparse.Namespace) -> int:
    from netlab.lab import Lab

    res = Lab.attach(a.lab).label(a.target, a.label)
    modes = ", ".join([f"{ref} {m['from']} -> {m['to']}" for ref, m in res["modes"].items()]
                      + [f"Service {ref} waypoint {w['from']} -> {w['to']}" for ref, w in res["waypoints"].items()])
    lines = [f"lab {res['lab']}: {res['change']}: {modes or 'nothing changed'}; {len(res['added'])} objects added, "
             f"{len(res['removed'])} removed"] + [f"  ZDS {z['op']} {z['pod']} on {z['node']}: {z['error'] or 'acked'}"
                                                  for z in res["zds"]]
    print(json.dumps(res, indent=2) if a.json else "\n".join(lines))
    return 0 if res["ok"] else 1


def cmd_plan(a: argparse.Namespace) -> int:
    from netlab.plan.build import build_plan
    from netlab.plan.render import render_text
    from netlab.topology.load import load_topology, resolve

    topo = load_topology(a.topology)
    tunnel: Literal["kernel", "userspace"] = "kernel" if a.tunnel == "kernel" else "userspace"
    plan = build_plan(topo, lab=a.name, tunnel=tunnel, source=str(resolve(a.topology)), datapath=a.datapath)
    print(plan.to_json() if a.json else render_text(plan))
    return 0


def cmd_exec(a: argparse.Namespace) -> int:
    from netlab.lab import Lab

    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        raise NetlabError("netlab exec: give a command after --, e.g. netlab exec sleep -- curl -s http://httpbin.bar:8000/get")
    Lab.attach(a.lab).exec(a.pod, cmd)  # replaces this process
    return 127


def cmd_list(a: argparse.Namespace) -> int:
    from netlab.topology.load import available, topologies_dir

    items = available()
    if a.json:
        print(json.dumps([{"name": n, "description": d} for n, d in items], indent=2))
        return 0
    print(f"topologies in {topologies_dir()}:")
    for n, d in items:
        print(f"  {n:<22} {d}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from netlab.doctor import run_checks

    results = run_checks()
    if a.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            mark = "ok  " if r.ok else ("warn" if not r.required else "FAIL")
            print(f"[{mark}] {r.name:<18} {r.detail}")
            if not r.ok:
                print(f"       used for: {r.used_for}\n       fix: {r.fix}")
    return 0 if all(r.ok or not r.required for r in results) else 3


def cmd_rules(a: argparse.Namespace) -> int:
    from netlab.lab import Lab

    out = Lab.attach(a.lab).rules(a.target)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for section, text in out.items():
            if section in ("target", "netns"):
                continue
            print(f"### {section}")
            print(text.rstrip() if isinstance(text, str) else json.dumps(text, indent=2))
            print()
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    from netlab.lab import Lab

    st = Lab.attach(a.lab).stats()
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"{'PROCESS':<34} {'KIND':<9} {'NODE':<10} {'PID':>7} {'RSS MiB':>8} {'ESTAB':>6} {'LISTEN':>6} {'FDS':>5}")
    for p in st["processes"]:
        print(f"{p['name']:<34} {p['kind']:<9} {p['node']:<10} {p['pid']:>7} {p['rss_kib'] / 1024:>8.1f} "
              f"{p['established']:>6} {p['listening']:>6} {p['fds']:>5}")
    if st["nodes"]:
        print()
        for node, n in sorted(st["nodes"].items()):
            print(f"node {node}: {n['proxies']} proxies, {n['proxy_rss_kib'] / 1024:.1f} MiB proxy RSS, "
                  f"{n['established']} connections")
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    from netlab.lab import Lab

    lab = Lab.attach(a.lab)
    if a.conn:
        legs, skipped = lab.connection_legs_counted(a.component)
        legs = legs[-a.lines:]
        if skipped:
            print(f"netlab: skipped {skipped} line{'s' if skipped != 1 else ''} of {lab.files.conn} "
                  "that are not connection legs", file=sys.stderr)
        if a.json:
            print(json.dumps([g.to_dict() for g in legs], indent=2))
            return 0
        for g in legs:
            ids = f" {g.src_id} -> {g.dst_id}" if g.src_id or g.dst_id else ""
            print(f"{g.time} {g.component:<24} {g.listener:<24} {g.src:>21} -> {g.orig_dst:<21} "
                  f"| {g.proto:<5} {g.up_src:>21} -> {g.up_dst:<21} "
                  f"{g.outcome:<6} up {g.bytes_up}B down {g.bytes_down}B{ids}")
        return 0
    if a.component is None:
        print("components: " + (", ".join(lab.components()) or "(none)"))
        return 0
    for line in lab.logs(a.component, lines=a.lines, follow=a.follow):
        print(line, flush=a.follow)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from netlab.export import export_k8s

    res = export_k8s(a.topology, a.output, a.datapath)
    if a.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    objs = ", ".join(f"{n} {k}" for k, n in sorted(res.objects.items()))
    print(f"exported {res.topology} for Istio {res.istio} ({res.datapath}), Kubernetes {res.kubernetes}, to {res.directory}:")
    print(f"  {objs}")
    print(f"  files: {', '.join(res.files)}")
    print(f"next: {res.directory}/install.sh (needs docker, kind, kubectl and a network), then {res.directory}/check.sh")
    return 0


def _relabel_help() -> str:
    from netlab.plan.relabel import LABEL_HELP
    return LABEL_HELP


def _export_help() -> str:
    from netlab.export.k8s import EXPORT_K8S_HELP
    return EXPORT_K8S_HELP


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netlab",
        description="Istio ambient & sidecar datapaths (the seed's 1.18 and today's in-pod), rebuilt in Linux network namespaces: "
                    "real veths, Geneve tunnels, iptables marks, policy routes and proxies you can trace hop by hop.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    from netlab.istio import DATAPATHS

    def lab_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--lab", help="lab name (may be left out when exactly one lab is up)")

    def datapath_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--datapath", choices=DATAPATHS, default=None,
                        help="istio-1.18: the seed's (node Geneve tunnels into the ztunnel pod, TPROXY there); "
                             "inpod: Istio 1.30.3 (rules inside each enrolled pod, ztunnel listening in the pod, "
                             "an istio-cni node agent handing pods over by ZDS); default: the topology's "
                             "`datapath` key, else istio-1.18")

    s = sub.add_parser("up", help="create a lab from a topology", description=(
        "Create every namespace, link, address, route, ip rule, ipset, iptables rule and process of a topology. "
        "Fails cleanly (nothing left behind) on any error."))
    s.add_argument("topology", help="a name from topologies/ (see `netlab list`) or a path to a YAML file; "
                                    "with --repair, the name of a running lab")
    s.add_argument("--repair", action="store_true",
                   help="restart the processes of a running lab whose supervisor died or whose processes "
                        "are dead (`netlab status` says degraded), under a new supervisor; its namespaces "
                        "and rules are not touched")
    s.add_argument("--name", help="lab name (default: the topology's name); prefixes every netns")
    s.add_argument("--tunnel", choices=("auto", "kernel", "userspace"), default="auto",
                   help="Geneve implementation for istioin/istioout: the kernel's, or userspace over TAP "
                        "(wire-identical); auto picks the kernel's when it works")
    datapath_opt(s)
    s.add_argument("--json", action="store_true", help="print the status JSON instead of a table")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("down", help="remove a lab and everything it made (also after a crash)")
    s.add_argument("lab", nargs="?", help="lab name (may be left out when exactly one lab is up)")
    s.add_argument("--all", action="store_true", help="remove every lab on this machine")
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="nodes, pods, services and processes of a running lab, and its health",
                       description="health: up; starting (an `up` or `up --repair` is at work); degraded (a "
                                   "process or its supervisor is dead, or a namespace is missing: the problems "
                                   "are listed; `netlab up --repair LAB` restarts the processes).")
    s.add_argument("lab", nargs="?")
    s.add_argument("--json", action="store_true",
                   help="JSON: {lab, topology, datapath, tunnel, health, problems:[...], supervisor:{pid,state}, "
                        "processes:[{name,kind,state,pid,restarts,last_exit}], nodes:[{name,netns,ip}], "
                        "pods:[{name,namespace,node,netns,ip,mode,ready[,live,probes]}] (ready/live: the kubelet stand-in's "
                        "verdicts for pods with probes; without: ready when the pod's processes run), services:[{name,namespace,vip,port,target_port}]}")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("label", help="change a namespace's or pod's label live: enrol/unenrol without restarts",
                       description=_relabel_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("target", metavar="namespace/NS|pod/NS/NAME")
    s.add_argument("label", metavar="KEY=VALUE|KEY-")
    lab_opt(s)
    s.add_argument("--json", action="store_true",
                   help="JSON: {lab, change, datapath, modes:{pod:{from,to}}, waypoints:{service:{from,to}}, "
                        "added:[...], removed:[...], zds:[{node,op,pod,error}], ok}")
    s.set_defaults(func=cmd_label)
    waypoint.add_parser(sub, lab_opt)  # netlab waypoint add|rm

    s = sub.add_parser("plan", help="print what `up` would create, without root",
                       description="Print the plan: every netns, link, address, route, ip rule, sysctl, ipset, "
                                   "iptables rule, file and process, in apply order. Pure: needs no root.")
    s.add_argument("topology")
    s.add_argument("--name", help="lab name used for netns names (default: topology name)")
    s.add_argument("--tunnel", choices=("kernel", "userspace"), default="userspace")
    datapath_opt(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("exec", help="run a command inside a pod's network namespace",
                       description="Run CMD in the pod's netns, with the lab's /etc/hosts so service names "
                                   "(<svc>.<ns>) resolve. POD is `name` or `namespace/name`.")
    lab_opt(s)
    s.add_argument("pod", metavar="POD")
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    s.set_defaults(func=cmd_exec)

    s = sub.add_parser("list", help="topologies you can bring up")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("doctor", help="check the kernel features the lab needs, and say what to do if one is missing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("rules", help="live iptables, ip rules, routes, ipsets and tunnels of a node or pod")
    lab_opt(s)
    s.add_argument("target", help="a node name, a pod (name or ns/name), or ztunnel:<node>")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_rules)

    seeing.add_parsers(sub, lab_opt, datapath_opt)  # trace, compare, capture, diagram, ui

    s = sub.add_parser("stats", help="memory (RSS) and connection counts per proxy process",
                       description="RSS, TCP connections and fds of every process of the lab, and the total proxy "
                                   "memory per node (compare ambient's one ztunnel per node with one sidecar per pod).")
    lab_opt(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("logs", help="logs of a lab process (ztunnel-<node>, <pod>.<ns>, geneve-<node>, ...)")
    lab_opt(s)
    s.add_argument("component", nargs="?", help="leave out to list components")
    s.add_argument("-n", "--lines", type=int, default=50)
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("--conn", action="store_true",
                   help="connection legs instead of process output: per proxied connection, the downstream "
                        "4-tuple, the original destination, the upstream 4-tuple (tcp or hbone), identities, bytes, outcome")
    s.add_argument("--json", action="store_true", help="with --conn: the legs as JSON")
    s.set_defaults(func=cmd_logs)

    from netlab.export.releases import DEFAULT_DATAPATH

    s = sub.add_parser("export", help="write a topology for a real cluster: `netlab export k8s TOPOLOGY -o DIR`",
                       description="Hand a lab's scenario to a real cluster. TARGET: k8s (Kubernetes + Istio, on kind).")
    esub = s.add_subparsers(dest="target", metavar="TARGET", required=True)
    k = esub.add_parser("k8s", help="Kubernetes objects, a kind cluster file, install.sh and check.sh",
                        description=_export_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  netlab export k8s ambient-to-sidecar -o s1-k8s && s1-k8s/install.sh && s1-k8s/check.sh\n"
                               "  netlab export k8s sidecar-to-ambient --datapath inpod -o s2-current")
    k.add_argument("topology", help="a name from topologies/ (see `netlab list`) or a path to a YAML file")
    k.add_argument("--datapath", choices=DATAPATHS, default=None,
                   help=f"which Istio release to pin: istio-1.18 = 1.18.2 (node Geneve tunnels, the lab's), "
                        f"inpod = 1.30.3 (in-pod redirection); default {DEFAULT_DATAPATH}")
    k.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write (created if missing)")
    k.add_argument("--json", action="store_true", help="print {directory, topology, datapath, istio, kubernetes, files, objects}")
    k.set_defaults(func=cmd_export)
    for sp in sub.choices.values():  # `netlab up x --debug` as well as `netlab --debug up x`
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    needs_root = a.command not in ("plan", "list", "export") and not (a.command == "diagram" and not a.trace)
    if needs_root and os.geteuid() != 0 and a.command != "doctor":
        print(f"netlab {a.command}: needs root (network namespaces, iptables); run with sudo", file=sys.stderr)
        return 1
    try:
        func: Callable[[argparse.Namespace], int] = a.func
        return func(a)
    except NetlabError as e:
        if a.debug:
            raise
        print(f"netlab {a.command}: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"netlab {a.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug (or a RecursionError, MemoryError): one line unless --debug
        if a.debug:
            raise
        print(f"netlab {a.command}: internal error: {type(e).__name__}: {_one_line(str(e), 200)} "
              f"(a bug; `netlab --debug {a.command} ...` shows the traceback)", file=sys.stderr)
        return 1


def _one_line(text: str, limit: int = 2000) -> str:
    """An error message as one line of printable text, whatever the user's input put into it."""
    text = " | ".join(part for part in text.splitlines() if part.strip()) or text
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + ".."

