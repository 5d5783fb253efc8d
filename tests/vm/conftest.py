"""Tests that need a kernel with geneve: run inside the virtme-ng VM by ``scripts/vm-test``.

``scripts/vm-test`` sets ``NETLAB_VM=1`` in the guest. There, missing kernel geneve is a hard
failure (that is what the VM is for). Anywhere else these tests are skipped unless this kernel
happens to have geneve (then they run as ordinary root-only kernel tests).
"""

from __future__ import annotations

import os
import platform

import pytest

IN_VM = os.environ.get("NETLAB_VM") == "1"
_support: bool | None = None


def kernel_geneve() -> bool:
    global _support
    if _support is None:
        from netlab.geneve.kernel import kernel_geneve_supported

        _support = kernel_geneve_supported(prefix="hv")
    return _support


def pytest_report_header(config: pytest.Config) -> list[str]:
    if os.geteuid() != 0:
        return [f"vm: kernel {platform.release()}, not root: tests/vm skipped"]
    try:  # what choose_tunnel("auto") decides, probed in an hv-prefixed scratch netns
        mode = "kernel" if kernel_geneve() else "userspace"
    except Exception as e:  # noqa: BLE001 - a header must not crash the session
        mode = f"probe failed: {e}"
    return [f"vm: kernel {platform.release()}, in VM: {IN_VM}, tunnel mode (--tunnel auto): {mode}"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture (the module-scoped labs) is set up."""
    if item.get_closest_marker("vm") is None:
        return
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if not kernel_geneve():
        if IN_VM:
            pytest.fail(f"kernel {platform.release()} in the VM has no geneve support")
        pytest.skip(f"kernel {platform.release()} has no geneve: run scripts/vm-test")


@pytest.fixture(scope="session", autouse=True)
def netlab_run_dir(tmp_path_factory: pytest.TempPathFactory):
    """Lab state goes to a private dir, not /run/netlab (session-wide, so module-scoped labs and
    their teardown see the same directory)."""
    d = tmp_path_factory.mktemp("netlab-run")
    old = os.environ.get("NETLAB_RUN_DIR")
    os.environ["NETLAB_RUN_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("NETLAB_RUN_DIR", None)
    else:
        os.environ["NETLAB_RUN_DIR"] = old
