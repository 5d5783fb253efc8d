"""The lab's istio-proxy sidecar (Envoy's datapath as configured by istiod 1.18, ambient profile).

Run by the supervisor as uid/gid 1337 inside the pod netns (``python -m netlab.mesh.sidecar --lab
L --pod ns/name``). Modules: :mod:`.outbound` (15001), :mod:`.inbound` (15006, 15008),
:mod:`.base` (the REDIRECT listener, Envoy's SAN match), :mod:`.proxy` (wiring; readiness on 15021).
"""
