"""Start ``netlab ui``: check the address, make the token, print the URL, run uvicorn.

Loopback only unless the user says ``--allow-remote``: the UI runs as root and speaks plain HTTP.
A token is required in both cases (another local user can reach 127.0.0.1 as well); it is made
fresh for each start (``secrets.token_urlsafe``) and printed only to the user who started it.
"""

from __future__ import annotations

import ipaddress
import secrets
import sys

from netlab.errors import NetlabError, UsageError


def check_address(host: str, port: int, allow_remote: bool) -> str:
    """The IP to bind (``localhost`` is 127.0.0.1); UsageError for anything else that is not allowed."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: a TCP port is 1-65535")
    name = "127.0.0.1" if host == "localhost" else host
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        raise UsageError(f"--host {host!r}: give an IP address (127.0.0.1, ::1, or with --allow-remote another)") from None
    if not ip.is_loopback and not allow_remote:
        raise UsageError(f"--host {host}: not a loopback address; the ui runs as root over plain HTTP, so another "
                         "address needs --allow-remote (and then every request needs the printed token)")
    return str(ip)


def run_ui(host: str = "127.0.0.1", port: int = 8080, allow_remote: bool = False) -> int:
    bind = check_address(host, port, allow_remote)
    try:
        import uvicorn

        from netlab.web.app import build_app
    except ImportError as e:
        raise NetlabError(f"netlab ui needs starlette and uvicorn ({e.name} is missing): "
                          "pip install starlette uvicorn, or scripts/install") from None
    from netlab.web.backend import LabBackend
    from netlab.web.guard import allowed_hosts

    token = secrets.token_urlsafe(32)
    shown = f"[{bind}]" if ":" in bind else bind
    app = build_app(LabBackend(), token=token, hosts=allowed_hosts(bind, port))
    print(f"netlab ui: open http://{shown}:{port}/?token={token}", flush=True)
    if not ipaddress.ip_address(bind).is_loopback:
        print("netlab ui: listening beyond loopback over plain HTTP: use it only on a network you trust", flush=True)
    config = uvicorn.Config(app, host=bind, port=port, log_level="warning", access_log=False,
                            server_header=False, proxy_headers=False, lifespan="off")
    try:
        uvicorn.Server(config).run()
    except OSError as e:
        raise NetlabError(f"cannot listen on {shown}:{port}: {e.strerror or e}") from None
    print("netlab ui: stopped", file=sys.stderr)
    return 0


__all__ = ["check_address", "run_ui"]
