"""Geneve for the ambient tunnels (reference §1.3, §2.1).

``kernel`` probes for kernel geneve and spells the pyroute2 link; when it is missing, the lab
uses TAP devices plus the userspace relay in ``encap``, whose wire format lives in ``wire``.
Submodules are imported explicitly (``from netlab.geneve import wire``) so that importing the
package stays free of scapy/pyroute2.
"""
