"""pytest support: a fixture that makes a guest test a few lines.

    def test_hello(run_guest):
        result = run_guest("hello")
        assert result.exit_status == 0
        assert "Hello" in result.serial_text

pyvmm registers this module as a pytest plugin, so the fixtures exist wherever pyvmm is
installed. Tests using them are skipped, with the reason, where /dev/kvm cannot be used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.errors import KvmUnavailableError
from pyvmm.guests import guest_path
from pyvmm.kvm import Kvm
from pyvmm.machine import Machine
from pyvmm.result import RunResult

#: Every guest run in a test ends by this many seconds unless the test says otherwise.
DEFAULT_TIMEOUT = 60.0


def kvm_unavailable_reason(path: str = "/dev/kvm") -> str | None:
    """Why KVM cannot be used here, or None if it can."""
    try:
        Kvm(path).close()
    except KvmUnavailableError as error:
        return error.message
    return None


@pytest.fixture
def kvm_required() -> None:
    """Skip the test, with the reason, where /dev/kvm cannot be used."""
    reason = kvm_unavailable_reason()
    if reason:
        pytest.skip(f"needs KVM: {reason}")


@pytest.fixture
def run_guest(kvm_required: None) -> Callable[..., RunResult]:
    """Return run(guest, memory=, cpus=, timeout=, mode=, setup=, **machine options).

    guest is a bundled guest name or a path; setup(machine) runs after loading and before
    running, to add devices. Serial output is captured into RunResult.serial.
    """

    def run(
        guest: str | Path,
        *,
        memory: int | str = "64M",
        cpus: int = 1,
        timeout: float = DEFAULT_TIMEOUT,
        mode: str | None = None,
        setup: Callable[[Machine], None] | None = None,
        **options: object,
    ) -> RunResult:
        with Machine(memory=memory, cpus=cpus, serial="capture", **options) as machine:
            machine.load(guest_path(str(guest)), mode)
            if setup is not None:
                setup(machine)
            return machine.run(timeout=timeout)

    return run


def open_fds() -> set[str]:
    """The file descriptors this process has open, as /proc/self/fd names them."""
    return set(os.listdir("/proc/self/fd"))
