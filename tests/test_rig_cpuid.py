"""The CPUID pyvmm gives a guest on the rig's KVM (6.12 kvm_amd on QEMU/TCG's SVM).

That KVM does not report CPUID.1:ECX[31] (hypervisor) in KVM_GET_SUPPORTED_CPUID, so here,
unlike on the host, a guest finds KVM's leaves (and Linux kvm-clock) only because pyvmm sets
the bit. The same mb_cpuid kernel then runs under QEMU with the same CPU (`-cpu host`) as the
reference: both must tell the same story, including XSAVE, where the nested layer
misreports the save-area size after XSETBV under either VMM (docs/rig.md).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvmm.kvm import Kvm
from tests.test_cpuid import TIMEOUT, compared, run_qemu

pytestmark = pytest.mark.rig
HYPERVISOR = 1 << 31


def supported_leaf1_ecx() -> int:
    cpuid = Kvm().supported_cpuid()
    return next(cpuid.entries[i].ecx for i in range(cpuid.nent) if cpuid.entries[i].function == 1)


def test_hypervisor_bit_and_kvm_leaves_as_under_qemu() -> None:
    # What makes this a test of pyvmm: the rig's KVM leaves the bit clear.
    assert not supported_leaf1_ecx() & HYPERVISOR
    ours = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "mb_cpuid", "--timeout", str(4 * TIMEOUT)],
        capture_output=True, text=True, timeout=6 * TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    lines = ours.stdout.splitlines()
    assert lines[:2] == [
        "hypervisor bit 1",
        "hypervisor leaf max 0x40000001 signature KVMKVMKVM",
    ], ours.stdout + ours.stderr
    qemu = run_qemu("-cpu", "host", timeout=10 * TIMEOUT)
    assert (ours.returncode, compared(ours.stdout)) == (qemu.returncode, compared(qemu.stdout)), (
        f"pyvmm {ours.returncode}:\n{ours.stdout}{ours.stderr}\n"
        f"QEMU {qemu.returncode}:\n{qemu.stdout}{qemu.stderr}"
    )
