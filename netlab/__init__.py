"""netlab: Istio 1.18's ambient and sidecar datapath, rebuilt in Linux network namespaces."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Lab", "__version__"]


def __getattr__(name: str):  # lazy: `import netlab` stays cheap for the CLI and the unit tests
    if name == "Lab":
        from netlab.lab import Lab

        return Lab
    raise AttributeError(name)
