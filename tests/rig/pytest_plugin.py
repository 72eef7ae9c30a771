"""pytest plugin: the ``rig`` marker.

Tests marked ``@pytest.mark.rig`` need the nested rig (a working /dev/kvm,
VFIO with iommufd, mdevs, tracefs). Outside the rig they are skipped with a
reason that names the command that runs them inside it. Enable it from
tests/conftest.py with ``pytest_plugins = ["tests.rig.pytest_plugin"]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The host-side command that runs the rig tests (documented in docs/rig.md).
RIG_COMMAND = "python -m tests.rig -- python -m pytest -m rig tests"

#: Written by the rig's init; its presence means "inside the rig".
ENV_FILE = Path("/run/pyvmm-rig.env")


def in_rig() -> bool:
    """True when running inside the nested rig (its init sets PYVMM_RIG=1)."""
    return os.environ.get("PYVMM_RIG") == "1" and ENV_FILE.exists()


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker so ``-m rig`` and --strict-markers know it."""
    config.addinivalue_line(
        "markers",
        f"rig: needs the nested KVM+VFIO+iommufd+mdev rig; run with `{RIG_COMMAND}`",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip rig tests outside the rig, saying how to run them."""
    if in_rig():
        return
    skip = pytest.mark.skip(reason=f"needs the nested rig: run `{RIG_COMMAND}`")
    for item in items:
        if "rig" in item.keywords:
            item.add_marker(skip)
