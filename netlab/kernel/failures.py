"""How apply names what failed: every error carries the plan object it was creating.

Each netlink request is tagged with its plan object (:func:`tag`), each ipset, iptables, sysctl
and file step catches its own error, and all of them end as :class:`ObjectError`, whose message
starts with the object's own description (``Route.describe()``: ``route 10.9.0.0/24 via
172.31.0.3 in netns lab-node-1: Network is unreachable``). apply rolls back and re-raises it as
:class:`ApplyError`.
"""

from __future__ import annotations

from collections.abc import Sequence

from netlab.kernel import rtnl


class ApplyError(RuntimeError):
    """Apply failed and was rolled back; the message names the object that failed."""


class ObjectError(Exception):
    """Creating ``obj`` (a plan object, or a text saying what was being done) failed."""

    def __init__(self, obj: object, err: BaseException | str) -> None:
        super().__init__(f"{what(obj)}: {errstr(err)}")
        self.obj = obj


def what(obj: object) -> str:
    """A plan object's description (``describe()``), or the text a request was tagged with."""
    describe = getattr(obj, "describe", None)
    return str(describe()) if callable(describe) else str(obj)


def errstr(err: BaseException | str) -> str:
    """An OSError's strerror without its errno and path (the object says what and where)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


def tag(req: rtnl.Request, obj: object) -> rtnl.Request:
    """``req`` tagged with the plan object it creates, which its error will name."""
    req.tag = obj
    return req


def check(failures: Sequence[tuple[rtnl.Request, rtnl.NetlinkError]]) -> None:
    """Raise for the first request of a batch the kernel refused."""
    if failures:
        req, err = failures[0]
        raise ObjectError(req.tag, err)
