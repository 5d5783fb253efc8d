"""``python -m netlab.mesh.nodeagent --lab LAB --node NODE``: see :mod:`netlab.mesh.nodeagent.agent`."""

from netlab.mesh.nodeagent.agent import main

if __name__ == "__main__":
    raise SystemExit(main())
