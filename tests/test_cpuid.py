"""The CPUID a guest sees, read by the mb_cpuid kernel as Linux reads it at boot.

The same kernel runs under QEMU (accel=kvm, its `-kernel` multiboot loader) and under pyvmm;
QEMU is the reference. Both must show the hypervisor bit and KVM's leaves (Linux finds
kvm-clock through them) and the boot CPU's APIC ID, and report the same XSAVE outcome. The
KVM feature word differs by design: QEMU's default model offers a subset, pyvmm what KVM
supports. Without QEMU only pyvmm's side runs.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyvmm import guest_path

pytestmark = pytest.mark.usefixtures("kvm_required")
TIMEOUT = 60
#: A line that depends on the CPU model rather than on the VMM.
_MODEL_LINES = ("kvm features ",)


def compared(stdout: str) -> list[str]:
    """The kernel's report, without the lines that depend on the CPU model."""
    return [line for line in stdout.splitlines() if not line.startswith(_MODEL_LINES)]


def run_qemu(*cpu: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """mb_cpuid under QEMU's q35 on KVM; the status is isa-debug-exit's ((r << 1) | 1) or 0."""
    command = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", *cpu, "-m", "64M",
        "-display", "none", "-serial", "stdio", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(guest_path("mb_cpuid")),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_pyvmm_offers_kvm_leaves_and_a_consistent_xsave(pyvmm_cli):
    ours = pyvmm_cli("run", "mb_cpuid", "--timeout", str(TIMEOUT), timeout=TIMEOUT + 30)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    lines = ours.stdout.splitlines()
    assert lines[:2] == ["hypervisor bit 1", "hypervisor leaf max 0x40000001 signature KVMKVMKVM"]
    assert "apic id 0" in lines and lines[-1] == "mb_cpuid: all ok"


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs qemu-system-x86_64")
def test_same_cpuid_report_as_qemu_with_the_host_cpu(pyvmm_cli):
    # -arch-capabilities: some hosts' QEMU aborts on MSR 0x10A with a plain -cpu host.
    qemu = run_qemu("-cpu", "host,-arch-capabilities")
    assert qemu.stdout.splitlines()[-1:] == ["mb_cpuid: all ok"], qemu.stdout + qemu.stderr
    ours = pyvmm_cli("run", "mb_cpuid", "--timeout", str(TIMEOUT), timeout=TIMEOUT + 30)
    assert compared(ours.stdout) == compared(qemu.stdout)
