"""``python -m netlab.mesh.waypoint --lab LAB --pod NS/NAME``: HBONE on 15008, readiness on 15021."""

from __future__ import annotations

from netlab.mesh.process import run_pod_proxy
from netlab.mesh.waypoint.proxy import Waypoint


def main(argv: list[str] | None = None) -> int:
    return run_pod_proxy(argv, kind="waypoint", description="waypoint proxy of a netlab lab",
                         start=lambda ctx, pod: Waypoint.for_pod(ctx, pod).start())


if __name__ == "__main__":
    raise SystemExit(main())
