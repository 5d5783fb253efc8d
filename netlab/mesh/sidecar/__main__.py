"""``python -m netlab.mesh.sidecar --lab LAB --pod NS/NAME``: see :mod:`netlab.mesh.sidecar.proxy`."""

from netlab.mesh.sidecar.proxy import main

if __name__ == "__main__":
    raise SystemExit(main())
