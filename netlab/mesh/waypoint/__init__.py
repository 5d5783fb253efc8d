"""The lab's waypoint proxy (Istio 1.18 ``istio-waypoint`` Envoy, L4 part): see :mod:`.proxy`.

Run by the supervisor in the waypoint pod's netns (``python -m netlab.mesh.waypoint --lab L --pod
ns/name``); the pod is neither captured by ztunnel nor has iptables (§7).
"""
