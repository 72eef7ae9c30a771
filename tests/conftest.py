"""Shared test set-up. The run_guest and kvm_required fixtures come from pyvmm.testing,
which pyvmm registers as a pytest plugin; the rig plugin skips `rig` tests outside the rig."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.ioctl import trace_to

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


@pytest.fixture
def traced() -> Iterator[io.StringIO]:
    """Every ioctl pyvmm issues during the test, as --trace prints it."""
    stream = io.StringIO()
    trace_to(stream)
    try:
        yield stream
    finally:
        trace_to(None)


@pytest.fixture
def modules(tmp_path):
    """Two multiboot module files: a short text one and one of more than a page (5000 bytes),
    small enough that a kernel below 1 MiB still has room for them under the EBDA."""
    first = tmp_path / "first.txt"
    first.write_bytes(b"first module, line one\nline two\n")
    second = tmp_path / "second.bin"
    second.write_bytes(b"second module\n" + bytes((i * 7 + 3) & 0xFF for i in range(4986)))
    return first, second
