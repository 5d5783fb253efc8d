"""``python -m netlab.mesh.ztunnel --lab LAB --node NODE``: the ztunnel of one node.

Started by the lab supervisor inside that node's ztunnel netns; reads the registry and its
certificates from the lab's state directory (``MeshContext``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from netlab import child_setup
from netlab.mesh.bootstrap import MeshContext
from netlab.mesh.relay import install_fast_loop
from netlab.mesh.ztunnel.app import run
from netlab.mesh.ztunnel.config import ZtunnelConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab.mesh.ztunnel", description=__doc__)
    p.add_argument("--lab", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--state-dir", default=None, help="default: the lab's state dir ($NETLAB_RUN_DIR/<lab>)")
    p.add_argument("--no-transparent", action="store_true", help="no IP_TRANSPARENT, no source spoofing")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = MeshContext.load(args.state_dir) if args.state_dir else MeshContext.for_lab(args.lab)
    own_ip = ctx.registry.ztunnels.get(args.node)
    if own_ip is None:
        p.error(f"no ztunnel for node {args.node!r} in the registry (nodes: {sorted(ctx.registry.ztunnels)})")
    cfg = ZtunnelConfig(lab=args.lab, node=args.node, own_ip=own_ip, transparent=not args.no_transparent)
    child_setup.setup()  # fd limit: two sockets per proxied connection (and a dup of each while relaying)
    install_fast_loop()
    asyncio.run(run(cfg, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
