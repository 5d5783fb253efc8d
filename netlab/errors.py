"""Errors the CLI turns into one line and an exit status, never a traceback."""

from __future__ import annotations


class NetlabError(Exception):
    """Base: ``str(e)`` is the whole user-facing message; ``exit_code`` the CLI's status."""

    exit_code = 1


class TopologyError(NetlabError):
    """The topology file is malformed or inconsistent (file, field path, expectation)."""

    exit_code = 2


class UsageError(NetlabError):
    """Bad command-line input: unknown lab, unknown pod, ambiguous name."""

    exit_code = 2


class LabStateError(NetlabError):
    """The lab is in the wrong state for the command (already up, not up)."""

    exit_code = 1


class KernelFeatureError(NetlabError):
    """A kernel feature the lab needs is missing (e.g. geneve with --tunnel kernel)."""

    exit_code = 3
