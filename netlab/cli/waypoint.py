"""``netlab waypoint add|rm``: a waypoint added to or removed from a running lab. The handler
and its parser, beside each other (as :mod:`netlab.cli.seeing`); the work is
:meth:`netlab.lab.Lab.waypoint` (:mod:`netlab.mesh.livewaypoint`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

Opt = Callable[[argparse.ArgumentParser], None]


def cmd_waypoint(a: argparse.Namespace) -> int:
    from netlab.lab import Lab

    res = Lab.attach(a.lab).waypoint(a.op, a.namespace, name=a.name, node=a.node)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    what = "added" if a.op == "add" else "removed"
    svcs = "".join(f"; Service {k} waypoint {v['from']} -> {v['to']}" for k, v in res["services"].items())
    proc = f", proxy pid {res['pid']}" if res.get("pid") else ""
    print(f"lab {res['lab']}: waypoint {res['pod']} {what} on {res['node']} ({res['ip']}, netns {res['netns']}{proc}); "
          f"{len(res['objects'])} kernel objects {what}{svcs}")
    return 0


def add_parser(sub: Any, lab_opt: Opt) -> None:
    from netlab.plan.waypoints import WAYPOINT_HELP

    s = sub.add_parser("waypoint", help="add or remove a namespace's waypoint in a running lab, no restarts",
                       description=WAYPOINT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("op", choices=("add", "rm"), help="add: make the waypoint and route through it; rm: remove it")
    s.add_argument("namespace", metavar="NAMESPACE", help="an ambient namespace of the lab")
    s.add_argument("--name", default="waypoint", help="the waypoint's name (default: waypoint)")
    s.add_argument("--node", help="add: the node its pod runs on (default: the node of the namespace's first pod)")
    lab_opt(s)
    s.add_argument("--json", action="store_true",
                   help="JSON: {lab, change, datapath, op, pod, node, ip, netns, processes:[...], objects:[...], "
                        "services:{service:{from,to}}, pid}")
    s.set_defaults(func=cmd_waypoint)
