"""The one check of every name that becomes a kernel or file-system name.

A lab's names end up as ``ip netns`` names (``/run/netns/<lab>-<ns>-<pod>``), interface names,
directory names under the state directory and SPIFFE identities. They come from topology files
and command lines that a hostile local user may write, so they are checked once, here, before
anything is made:

* full match (``re.fullmatch``, or ``\\Z``): ``$`` would also match before a final newline, and a
  name ``"sleep\\n"`` makes a namespace that splits ``ip netns list``;
* never empty;
* a length that fits where the name goes (an interface name, a file name).

Kubernetes' own rules are used where a name stands for a Kubernetes object, so a name that works
in a cluster works here and vice versa (apimachinery ``validation.IsDNS1123Label`` /
``IsDNS1123Subdomain``): namespaces are DNS-1123 labels (``ValidateNamespaceName``), service
accounts DNS-1123 subdomains (``ValidateServiceAccountName``). Pod, service and waypoint names,
which Kubernetes allows to be subdomains, are labels here because they are parts of netns names.

This module is at the bottom of the package: it imports nothing from netlab.
"""

from __future__ import annotations

import re

__all__ = [
    "IFNAMSIZ",
    "LAB_NAME_MAX",
    "LAB_NAME_RE",
    "NAME_MAX",
    "BadName",
    "cert_dir_name",
    "check_file_name",
    "check_lab_name",
    "check_label",
    "check_subdomain",
    "shown",
]

IFNAMSIZ = 15  # Linux interface names are at most 15 bytes (IFNAMSIZ - 1)
NAME_MAX = 255  # one path component (a netns file, a directory) on Linux file systems
DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
LAB_NAME_MAX = 40  # leaves room for "-<namespace>-<pod>" in netns names

_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = re.compile(_LABEL)
_DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# For callers that use ``.match``: anchored at both ends by ``\Z`` (never ``$``), so match is fullmatch.
LAB_NAME_RE = re.compile(rf"[a-z0-9](?:[-a-z0-9]{{0,{LAB_NAME_MAX - 2}}}[a-z0-9])?\Z")


class BadName(ValueError):
    """A name that must not be used. A ValueError, so pydantic validators report it per field."""


def shown(value: object, limit: int = 40) -> str:
    """``repr`` of a user's value, cut short: an error stays one readable line whatever it holds."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + ".."


def _check(value: object, what: str, pattern: re.Pattern[str], rule: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise BadName(f"{what} must be a string, got {type(value).__name__}")
    if value == "":
        raise BadName(f"{what} is empty")
    if len(value) > max_len:
        raise BadName(f"{what} {shown(value)} is {len(value)} characters; at most {max_len} allowed")
    if not pattern.fullmatch(value):
        raise BadName(f"{what} {shown(value)} must be {rule}")
    return value


def check_label(value: object, what: str, max_len: int = DNS1123_LABEL_MAX) -> str:
    """A DNS-1123 label (Kubernetes ``IsDNS1123Label``), at most ``max_len`` characters."""
    return _check(value, what, _DNS1123_LABEL, "lowercase letters, digits and '-', starting and ending "
                  "with a letter or digit (a DNS-1123 label)", min(max_len, DNS1123_LABEL_MAX))


def check_subdomain(value: object, what: str) -> str:
    """A DNS-1123 subdomain (Kubernetes ``IsDNS1123Subdomain``): labels joined by '.'."""
    return _check(value, what, _DNS1123_SUBDOMAIN, "lowercase letters, digits, '-' and '.', each '.'-separated "
                  "part starting and ending with a letter or digit (a DNS-1123 subdomain)", DNS1123_SUBDOMAIN_MAX)


def check_lab_name(value: object, what: str = "lab name") -> str:
    """A lab name: it prefixes every netns name and names the lab's state directory."""
    return check_label(value, what, LAB_NAME_MAX)


def check_file_name(value: str, what: str) -> str:
    """A name used as one path component (a netns file, a directory): no '/', NUL or control
    character, not '.' or '..', at most NAME_MAX bytes."""
    if value in ("", ".", "..") or "/" in value or not value.isprintable():
        raise BadName(f"{what} {shown(value)} cannot be a file name")
    if len(value.encode()) > NAME_MAX:
        raise BadName(f"{what} {shown(value)} is {len(value.encode())} bytes; a file name holds at most {NAME_MAX}")
    return value


def cert_dir_name(identity: str) -> str:
    """The directory (one path component) holding an identity's certificate and key.

    One-to-one for every identity, not only for Kubernetes names: ``%`` and ``_`` are escaped
    before ``/`` becomes ``_``, so ``spiffe://td/ns/a/sa/x/y`` and ``.../sa/x_y`` never share a
    directory (and so never share a key). For ns/sa made of Kubernetes names (which hold neither
    ``%`` nor ``_``) the result reads as ``<td>_ns_<ns>_sa_<sa>``.
    """
    scheme = "spiffe://"
    if not identity.startswith(scheme) or "/" not in identity[len(scheme):]:
        raise BadName(f"not a SPIFFE identity: {shown(identity)}")
    body = identity[len(scheme):].replace("%", "%25").replace("_", "%5F").replace("/", "_")
    return check_file_name(body, f"certificate directory of {identity[:60]!r}")
