"""`netlab export`: hand a lab's scenario to a real cluster.

``export_k8s`` writes the Kubernetes and Istio objects of a topology, a kind cluster file, an
install script for the pinned Istio release, a check script and a README into one directory
(``netlab.export.k8s``). The datapath-dependent choices live in ``netlab.export.releases``.
"""

from netlab.export.k8s import ExportResult, export_k8s
from netlab.export.objects import ExportError
from netlab.export.releases import DATAPATHS, DEFAULT_DATAPATH

__all__ = ["DATAPATHS", "DEFAULT_DATAPATH", "ExportError", "ExportResult", "export_k8s"]
