"""What verify needs of a running lab, as a type: ``netlab.lab.Lab`` has it all.

verify sits below ``netlab.lab`` (the lab API is built on verify, not the other way round), so
its functions take a running lab as this protocol; the CLI attaches the lab and passes it in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from netlab.plan.types import Plan, PodInfo


class LabView(Protocol):
    """A running lab: its name, the plan it was built from and its state directory."""

    @property
    def name(self) -> str: ...

    @property
    def plan(self) -> Plan: ...

    @property
    def state_dir(self) -> Path: ...

    def pod(self, ref: str) -> PodInfo:
        """A pod by ``name`` or ``namespace/name``; UsageError if there is none (or several)."""
        ...

    def netns_of(self, target: str) -> str:
        """A node, a pod, ``ztunnel:<node>`` or a full netns name -> the full netns name."""
        ...
