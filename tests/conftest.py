"""Shared test set-up. The run_guest and kvm_required fixtures come from pyvmm.testing,
which pyvmm registers as a pytest plugin; the rig plugin skips `rig` tests outside the rig."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.rig.pytest_plugin"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pyvmm_cli():
    """Run the pyvmm command in a subprocess: cli(*args, timeout=60) -> CompletedProcess."""

    def run(*args: str, timeout: float = 60, **options) -> subprocess.CompletedProcess:
        options.setdefault("stdin", subprocess.DEVNULL)
        if options.get("input") is not None or options["stdin"] is None:
            options.pop("stdin")
        return subprocess.run(
            [sys.executable, "-m", "pyvmm", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            **options,
        )

    return run
