"""pyvmm's hello guest, booted on the rig's inner /dev/kvm (kvm_amd, nested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.rig

REPO = Path(__file__).resolve().parent.parent
GREETING = "Hello from a pyvmm guest!"


def test_hello_guest_on_inner_kvm() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "--timeout", "120"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert GREETING in r.stdout, r.stdout
