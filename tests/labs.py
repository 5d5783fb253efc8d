"""Labs the kernel tests bring up once per module, under each datapath."""

from __future__ import annotations

from collections.abc import Iterator

from netlab.lab import Lab

#: what a module's ``lab`` fixture is parametrised with to run its tests under both datapaths
DATAPATHS = ["istio-1.18", "inpod"]


def up_for_datapath(topology: str, datapath: str, names: tuple[str, str]) -> Iterator[Lab]:
    """``topology`` up under ``datapath`` (named ``names[0]`` for istio-1.18, ``names[1]`` for
    inpod: two modules' labs may exist at once), taken down when the fixture ends."""
    lab = Lab.up(topology, name=names[datapath == "inpod"], datapath=datapath)
    try:
        yield lab
    finally:
        lab.down()
