"""Writing a namespace's sysctls: from a thread inside the namespace, ``net.*`` only."""

from __future__ import annotations

from netlab.kernel.failures import ObjectError
from netlab.plan.types import Sysctl


def sysctl_path(key: str) -> str:
    """``net.ipv4.conf.eth0.rp_filter`` -> ``/proc/sys/net/ipv4/conf/eth0/rp_filter`` (device
    names may contain dots, so only the fixed parts are split)."""
    parts = key.split(".")
    if len(parts) >= 5 and parts[0] == "net" and parts[2] in ("conf", "neigh"):
        return "/proc/sys/" + "/".join(parts[:3] + [".".join(parts[3:-1]), parts[-1]])
    return "/proc/sys/" + "/".join(parts)


def write_sysctl(s: Sysctl) -> None:
    """Written from the calling thread, which is inside ``s.netns``: /proc/sys/net resolves to
    the netns of the task (thread) that opens it."""
    if not s.key_name.startswith("net."):
        raise ObjectError(s, "only net.* sysctls are per-namespace; refusing to write a host-wide setting")
    try:
        with open(sysctl_path(s.key_name), "w") as f:
            f.write(s.value)
    except FileNotFoundError as e:
        if not s.optional:
            raise ObjectError(s, e) from e
    except OSError as e:
        raise ObjectError(s, e) from e
