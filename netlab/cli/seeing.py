"""The commands that look at a lab from the outside (``trace``, ``compare``, ``capture``, ``diagram``,
``ui``): their handlers and their parsers, kept beside each other so the shell in
:mod:`netlab.cli` stays a list of commands. Each handler is a thin call into :mod:`netlab.verify`
(or :mod:`netlab.web`), imported lazily so ``netlab plan`` does not pay for scapy or Starlette.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from netlab.errors import UsageError

Opt = Callable[[argparse.ArgumentParser], None]


def cmd_trace(a: argparse.Namespace) -> int:
    from netlab.lab import Lab
    from netlab.verify.trace import trace

    lab = Lab.attach(a.lab)
    if a.probe:  # one kubelet probe from the pod's node (netlab.verify.probetrace)
        from netlab.verify.probetrace import trace_probe

        if a.src or a.dst or a.contract:
            raise UsageError("--probe POD traces a kubelet probe: leave out --from, --to and --contract")
        res = trace_probe(lab, a.probe, a.probe_kind)
    elif not (a.src and a.dst):
        raise UsageError("give --from POD --to HOST[:PORT] (a request), or --probe POD (a kubelet probe)")
    else:
        res = trace(lab, a.src, a.dst, a.url, contract=a.contract)
    if a.html:  # the same hops as a page: figure, list, details (netlab.verify.html)
        from netlab.verify.html import write_trace_html

        write_trace_html(a.html, lab.plan, res.to_dict())
        print(f"wrote {a.html}: {len(res.hops)} hops", file=sys.stderr)
    if a.json:
        print(json.dumps(res.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(res.render())
    return 1 if res.matched is False else 0  # 0 also when there was no contract to check


def cmd_compare(a: argparse.Namespace) -> int:
    from netlab.lab import Lab
    from netlab.verify import compare

    cmp = compare.run(a.topology, path=a.path, base=a.name, keep=a.keep, down=Lab.down_lab,
                      up=lambda name, dp: Lab.up(a.topology, name=name, datapath=dp))
    if a.html:  # the two traces as two panes of one page (netlab.verify.html)
        from netlab.verify.diagram import write_nofollow
        from netlab.verify.html import compare_page

        write_nofollow(a.html, compare_page(*((cmp.plans[dp], cmp.results[dp].to_dict(), dp) for dp, _ in compare.SIDES)))
        print(f"wrote {a.html}", file=sys.stderr)
    print(json.dumps(cmp.to_dict(), indent=2, ensure_ascii=False) if a.json else cmp.render())
    return 0 if cmp.ok else 1


def cmd_capture(a: argparse.Namespace) -> int:
    from netlab.lab import Lab
    from netlab.verify.capture import DEFAULT_FILTER, capture

    bpf = DEFAULT_FILTER if a.filter is None else (a.filter or None)  # --filter "": everything
    rc, summary = capture(Lab.attach(a.lab), a.write, ifaces=a.iface or (), hops=a.hops, bpf=bpf, cmd=a.cmd or ())
    print(summary, file=sys.stderr)
    return rc


def cmd_diagram(a: argparse.Namespace) -> int:
    from netlab.verify.diagram import run_cli

    return run_cli(a)


def cmd_ui(a: argparse.Namespace) -> int:
    from netlab.web.serve import run_ui

    return run_ui(a.host, a.port, a.allow_remote)


def add_parsers(sub: Any, lab_opt: Opt, datapath_opt: Opt) -> None:
    """Register the five commands on the top-level subparsers (``lab_opt``/``datapath_opt`` add the
    shared ``--lab`` and ``--datapath`` options, as for every other command)."""
    s = sub.add_parser("trace", help="send a tagged request and show every hop it takes, checked against the path's contract",
                       description="Send a real request from a pod, capture it on every interface of every namespace "
                                   "it may cross, join the proxies' connection legs, and print the hops in order "
                                   "(namespace, interface, direction, addresses, Geneve VNI, iptables rules that "
                                   "matched, ip rule/table, proxy leg). Exit 0 when the hops match the path's (its inpod: one in an inpod lab) "
                                   "hop contract, 1 when they do not (naming the first hop that diverged).")
    lab_opt(s)
    s.add_argument("--from", dest="src", metavar="POD", help="client pod (name or ns/name)")
    s.add_argument("--to", dest="dst", metavar="HOST[:PORT]",
                   help="service name (<svc>.<ns>), VIP or pod IP, with the port (default 80)")
    s.add_argument("--path", dest="url", default=None, help="HTTP path to request (default: the contract's, else /)")
    s.add_argument("--contract", default=None, help="name of the topology path whose hops to check (default: by from/to)")
    s.add_argument("--probe", metavar="POD", default=None,
                   help="instead: send POD's kubelet probe once from its node and check the release's probe "
                        "contract; exit 1 names the hop where it left it (e.g. a removed probe exemption)")
    s.add_argument("--probe-kind", choices=("readiness", "liveness"), default="readiness",
                   help="which probe of the pod (default readiness)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--html", metavar="FILE.html", default=None,
                   help="also write one self-contained page: the drawing beside the numbered hops; hover or click "
                        "a hop for its rules, marks, route, encapsulation and proxy leg; a step control walks them")
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser("compare", help="one request through both datapaths (istio-1.18 and inpod), side by side",
                       description="Bring TOPOLOGY up twice, as <lab>-1-18 and <lab>-inpod, trace the same path in "
                                   "each (against that datapath's contract), print the two hop lists side by side "
                                   "with what disappeared and what appeared (devices, rules, marks, tables, "
                                   "listeners), and tear both labs down. Exit 1 if either trace misses its contract.",
                       epilog="example: sudo netlab compare sidecar-to-ambient --path S3 --html s3.html")
    s.add_argument("topology", help="a shipped topology name or a YAML file")
    s.add_argument("--path", default=None, help="the topology path to send (default: its first)")
    s.add_argument("--name", default=None, help="base lab name (default: the topology's name)")
    s.add_argument("--keep", action="store_true", help="leave both labs up (trace, capture or diagram them further)")
    s.add_argument("--json", action="store_true", help="both traces, the aligned rows, disappeared/appeared as JSON")
    s.add_argument("--html", metavar="FILE.html", default=None, help="also write both traces as two panes of one page")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("capture", help="capture lab interfaces to pcapng (one interface per <netns>/<iface>)",
                       description="Capture while CMD runs (or until Ctrl-C) and write pcapng whose interfaces are "
                                   "named <netns>/<iface>; open it in Wireshark or tshark.")
    lab_opt(s)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--hops", nargs="?", const="", default=None, metavar="PATH",
                   help="the interfaces of a topology path's hop contract (default: every path's)")
    g.add_argument("--iface", action="append", metavar="NETNS:IFACE", help="an interface to capture (repeatable)")
    s.add_argument("-w", "--write", required=True, metavar="FILE.pcapng")
    s.add_argument("--filter", default=None, help="BPF filter (default: everything but ARP/IPv6 noise)")
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    s.set_defaults(func=cmd_capture)

    s = sub.add_parser("diagram", help="draw the lab (or a topology) as SVG, optionally with a traced path",
                       description="Each node a box holding its pods, ztunnel and tunnel devices, the node's own "
                                   "namespace inside it, the fabric below; with --trace, the observed hops drawn over "
                                   "it as numbered arrows (the seed's numbers where the path's contract matched), "
                                   "and the hop list under the figure. -o FILE.svg, .png or .pdf (rsvg-convert).")
    s.add_argument("target", metavar="LAB|TOPOLOGY")
    s.add_argument("-o", "--output", required=True, metavar="FILE.svg")
    s.add_argument("--trace", nargs=2, metavar=("FROM", "TO"), help="trace a request first and draw its hops")
    datapath_opt(s)
    s.set_defaults(func=cmd_diagram)

    s = sub.add_parser("ui", help="a local web view: running labs, their figures and processes, traces on demand",
                       description="Serve a web page (Starlette on uvicorn) that lists the running labs, draws the "
                                   "chosen one, shows its processes' health, runs a trace from a pod to a service and "
                                   "shows it hop by hop with the contract verdict, and hands out the trace's capture "
                                   "as pcapng. Binds 127.0.0.1; every request needs the token in the printed URL.")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--allow-remote", action="store_true",
                   help="allow a --host that is not loopback (plain HTTP: only on a network you trust)")
    s.set_defaults(func=cmd_ui)
