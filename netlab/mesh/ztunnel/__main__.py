"""``python -m netlab.mesh.ztunnel --lab LAB --node NODE``: the ztunnel of one node.

Started by the lab supervisor inside that node's ztunnel netns; reads the registry and its
certificates from the lab's state directory (``MeshContext``).
"""

from __future__ import annotations

import argparse
import sys

from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.process import run_proxy
from netlab.mesh.ztunnel.app import Ztunnel, start
from netlab.mesh.ztunnel.config import ZtunnelConfig
from netlab.state import StateDir


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lab", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--state-dir", default=None, help="default: the lab's state dir ($NETLAB_RUN_DIR/<lab>)")
    p.add_argument("--no-transparent", action="store_true", help="no IP_TRANSPARENT, no source spoofing")


async def _start(args: argparse.Namespace, p: argparse.ArgumentParser) -> Ztunnel:
    ctx = MeshContext.load(args.state_dir) if args.state_dir else MeshContext.for_lab(args.lab)
    own_ip = ctx.registry.ztunnels.get(args.node)
    if own_ip is None:
        p.error(f"no ztunnel for node {args.node!r} in the registry (nodes: {sorted(ctx.registry.ztunnels)})")
    # istiod's release decides the mode: in-pod, the node agent hands over the pods (ZDS)
    zds = StateDir(ctx.state_dir).zds_socket(args.node) if ctx.registry.inpod else None
    cfg = ZtunnelConfig(lab=args.lab, node=args.node, own_ip=own_ip, transparent=not args.no_transparent, zds=zds)
    return await start(cfg, ctx)


def main(argv: list[str] | None = None) -> int:
    return run_proxy(argv, prog="netlab.mesh.ztunnel", description=__doc__, add_arguments=_arguments, start=_start,
                     log_name=lambda a: f"ztunnel[{a.node}]", default_log_level="WARNING")


if __name__ == "__main__":
    sys.exit(main())
