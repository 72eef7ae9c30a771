"""The CPU model: mb_cpumodel dumps every CPUID leaf and subleaf and probes a list of MSRs
under QEMU (-accel kvm -cpu host,-arch-capabilities) and under pyvmm; the two must agree
except for the differences docs/guest-abi.md ("The CPU model") lists, masked here field by
field, so that a new difference fails the test.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyvmm import guest_path

pytestmark = pytest.mark.usefixtures("kvm_required")
TIMEOUT = 60
ALL = 0xFFFFFFFF
#: CPUID leaf.subleaf -> bits of (EAX, EBX, ECX, EDX) that differ by design, and why
#: (docs/guest-abi.md has the same list).
CPUID_MASKS: dict[str, tuple[tuple[int, int, int, int], str]] = {
    "00000001.0": ((0, 0x00FF0000, 0, 0), "topology: logical processor count"),
    "00000004": ((0xFFFFC000, 0, 0, 0), "topology: cores and threads sharing each cache"),
    "00000007.1": ((ALL, 0, 0, 0), "QEMU 7.2 drops AVX512_BF16 from 7.1 EAX"),
    "0000000b": ((ALL, ALL, ALL, ALL), "topology: x2APIC levels"),
    "0000001f": ((ALL, ALL, ALL, ALL), "topology: x2APIC levels"),
    "40000001.0": ((ALL, 0, 0, 0), "pyvmm offers every KVM paravirtual feature"),
    "80000001.0": ((0, 0xF0000000, 0x00400000, 0), "package type; TOPOEXT"),
    "80000005.0": ((ALL, ALL, ALL, ALL), "QEMU's built-in L1 cache and TLB model"),
    "80000006.0": ((ALL, ALL, ALL, ALL), "QEMU's built-in L2/L3 cache and TLB model"),
    "80000007.0": ((0, 0, 0, 0x100), "invariant TSC: QEMU offers it only with +invtsc"),
    "80000008.0": ((0, ALL, ALL, 0), "features QEMU 7.2 does not know; core count"),
    "8000001a.0": ((ALL, 0, 0, 0), "performance hints QEMU 7.2 does not pass"),
    "8000001d": ((ALL, ALL, ALL, ALL), "QEMU's built-in cache topology"),
    "8000001e.0": ((ALL, ALL, ALL, ALL), "topology: compute unit and node IDs"),
    "80000021.0": ((ALL, ALL, ALL, ALL), "leaf QEMU 7.2 does not pass"),
}
#: MSRs whose value differs by design: state SeaBIOS leaves behind, or what QEMU sets up.
MSR_MASKS = {
    "00000012": "SeaBIOS leaves kvm-clock on",
    "4b564d01": "SeaBIOS leaves kvm-clock on",
    "00000179": "machine check: QEMU sets up 10 banks (KVM_X86_SETUP_MCE), pyvmm none",
    "00000400": "machine check: QEMU enables bank 0 at reset",
    "00000200": "MTRRs: SeaBIOS programs them, pyvmm only the default type",
    "00000201": "MTRRs",
    "00000250": "MTRRs",
    "00000258": "MTRRs",
    "00000268": "MTRRs",
    "0000026f": "MTRRs",
}


def report(stdout: str) -> dict[str, str]:
    """The kernel's lines by item ("cpuid 00000001.0", "msr 0000001b"): the values."""
    items = {}
    for line in stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("cpuid", "msr"):
            key, _, value = rest.partition(" ")
            items[f"{kind} {key}"] = value
    return items


def cpuid_mask(key: str) -> tuple[int, int, int, int] | None:
    leaf = key.split(".")[0]
    found = CPUID_MASKS.get(key) or CPUID_MASKS.get(leaf)
    return found[0] if found else None


def differences(ours: dict[str, str], qemu: dict[str, str]) -> list[str]:
    """Items that differ outside the masks (an item only one side has counts, unless its
    whole value is masked)."""
    found = []
    for item in sorted(set(ours) | set(qemu)):
        kind, key = item.split()
        mine, theirs = ours.get(item), qemu.get(item)
        if mine == theirs:
            continue
        if kind == "msr":
            if key not in MSR_MASKS:
                found.append(f"{item}: pyvmm {mine}, QEMU {theirs}")
            continue
        mask = cpuid_mask(key)
        words = [[int(w, 16) for w in (v or "0 0 0 0").split()] for v in (mine, theirs)]
        if mask is None or any((a ^ b) & ~m for a, b, m in zip(*words, mask, strict=True)):
            found.append(f"{item}: pyvmm {mine}, QEMU {theirs}")
    return found


def run_pyvmm(pyvmm_cli, *args: str) -> subprocess.CompletedProcess:
    completed = pyvmm_cli("run", *args, "mb_cpumodel", "--timeout", str(TIMEOUT),
                          timeout=TIMEOUT + 30)  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.splitlines()[-1].startswith("mb_cpumodel: ")
    return completed


def test_pyvmm_reports_the_model(pyvmm_cli):
    items = report(run_pyvmm(pyvmm_cli).stdout)
    assert items["cpuid 00000001.0"].split()[2][0] in "89abcdef"  # the hypervisor bit
    assert items["cpuid 40000000.0"].split()[1:] == ["4b4d564b", "564b4d56", "0000004d"]
    assert items["msr 0000001b"] != "gp" and items["msr c0000080"] != "gp"


def test_the_firmware_gives_the_same_model(pyvmm_cli):
    assert run_pyvmm(pyvmm_cli, "--firmware").stdout == run_pyvmm(pyvmm_cli).stdout


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs qemu-system-x86_64")
def test_same_model_as_qemu_but_for_the_documented_differences(pyvmm_cli):
    # -arch-capabilities: some hosts' QEMU aborts on MSR 0x10A with a plain -cpu host; the
    # MSR then reads as QEMU chose, which is QEMU's difference, not pyvmm's.
    qemu = subprocess.run(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "kvm",
         "-cpu", "host,-arch-capabilities", "-m", "64M", "-display", "none",
         "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-kernel", str(guest_path("mb_cpumodel"))],
        capture_output=True, text=True, timeout=TIMEOUT * 2,
    )  # fmt: skip
    assert qemu.stdout.splitlines()[-1:] != [], qemu.stderr
    assert qemu.stdout.splitlines()[-1].startswith("mb_cpumodel: "), qemu.stdout + qemu.stderr
    ours, theirs = report(run_pyvmm(pyvmm_cli).stdout), report(qemu.stdout)
    assert sum(item.startswith("msr") for item in theirs) == sum(
        item.startswith("msr") for item in ours
    )
    assert differences(ours, theirs) == []
