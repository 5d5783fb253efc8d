"""netlab: Istio 1.18's ambient and sidecar datapath, rebuilt in Linux network namespaces."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netlab.lab import Lab

__version__ = "0.1.0"
__all__ = ["Lab", "__version__"]


def __getattr__(name: str) -> object:  # lazy: `import netlab` stays cheap for the CLI and the unit tests
    if name == "Lab":
        from netlab.lab import Lab

        return Lab
    raise AttributeError(name)
