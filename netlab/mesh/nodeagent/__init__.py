"""istio-cni's node agent for the in-pod datapath: one process per node (``istio-cni-<node>``)
that hands each enrolled pod's network namespace to that node's ztunnel over ZDS (inpod reference
§2.3, §3.1). :mod:`.agent` is the agent; ``python -m netlab.mesh.nodeagent --lab L --node N``
runs it. Its pods' rules are the plan's (``apply`` installs them at ``up``), so what it does at
run time is the ZDS half of enrollment.
"""
