"""x86 CPU state at guest entry: GDT, identity-mapped page tables, segments, CPUID, MSRs.

The VMM enters the guest directly in the mode the image needs (docs/guest-abi.md), as
kvmtool and Firecracker do, instead of running firmware that would switch modes.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Mapping

import numpy as np

from pyvmm._native import ffi
from pyvmm.kvm import Cdata, Vcpu
from pyvmm.layout import (
    BOOT_GDT,
    PAGE_DIRECTORIES_START,
    PDPT,
    PML4,
    Region,
    boot_regions,
    check_layout,
    plan_identity_map,
)
from pyvmm.memory import GuestMemory

#: GDT selectors (docs/guest-abi.md).
CODE64_SELECTOR = 0x08
DATA_SELECTOR = 0x10
CODE32_SELECTOR = 0x18
#: Descriptors in GDT order: null, 64-bit code, flat data, 32-bit code.
GDT_ENTRIES = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF)

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
PAGE_PRESENT, PAGE_WRITE, PAGE_HUGE = 1, 2, 0x80
TWO_MIB = 2 << 20

MSR_MTRR_DEF_TYPE = 0x2FF
#: MTRRs enabled, default type write-back. Once a VFIO device makes DMA non-coherent, KVM
#: honours guest MTRRs, and a guest left with the reset value (uncached) crawls.
MTRR_DEF_TYPE_WB_ENABLED = 0xC06
CPUID_1_ECX_HYPERVISOR = 1 << 31
#: CPUID.5:ECX: MONITOR/MWAIT extensions enumerated, interrupts break MWAIT: QEMU sets both.
CPUID_5_ECX_EMX_IBE = 0x3
#: The processor brand string leaves: 16 bytes each.
BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)


MSR_IA32_UCODE_REV = 0x8B


@functools.cache
def _host_cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty if it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def host_brand_string() -> bytes:
    """The host CPU's brand string, 48 bytes NUL-padded, as QEMU's -cpu host passes it on
    (KVM_GET_SUPPORTED_CPUID leaves it empty)."""
    brand = _host_cpuinfo().get("model name", "")
    return brand.encode("ascii", "replace")[:47].ljust(48, b"\0")


def model_msrs() -> dict[int, int]:
    """MSRs that are part of the CPU model: the host's microcode revision, as QEMU gives
    -cpu host (in the low half on AMD, the high half on Intel); none if it is unknown."""
    info = _host_cpuinfo()
    try:
        revision = int(info.get("microcode", ""), 0)
    except ValueError:
        return {}
    if info.get("vendor_id") != "AuthenticAMD":
        revision <<= 32
    return {MSR_IA32_UCODE_REV: revision}


class CpuMode(enum.Enum):
    """The mode a guest is entered in."""

    LONG = "long"
    PROTECTED = "protected"
    REAL = "real"


def write_boot_tables(
    memory: GuestMemory,
    mode: CpuMode,
    device_top: int = 0,
    protocol: str = "elf",
    placed: tuple[Region, ...] | None = None,
) -> None:
    """Write the GDT, and in long mode page tables identity-mapping [0, max(4 GiB, RAM top,
    device_top)) (device_top: the end of any BAR placed above RAM), where pyvmm's layout
    (layout.py) puts them for protocol's guests; ConfigurationError if they do not fit.

    placed: the GDT (first) and the protocol's regions where the boot put them, if it
    moved them (a multiboot kernel below 1 MiB; protected mode only).
    """
    if mode is CpuMode.REAL:
        return
    gdt = placed[0] if placed else BOOT_GDT
    memory.view(gdt.start, 8 * len(GDT_ENTRIES), np.uint64)[:] = GDT_ENTRIES
    if mode is not CpuMode.LONG:
        check_layout(boot_regions(protocol, 0, placed))
        return
    gigabytes = plan_identity_map(protocol, memory.top, device_top)
    memory.view(PML4.start, 8, np.uint64)[0] = PDPT.start | PAGE_PRESENT | PAGE_WRITE
    directories = PAGE_DIRECTORIES_START + 4096 * np.arange(gigabytes, dtype=np.uint64)
    memory.view(PDPT.start, 8 * gigabytes, np.uint64)[:] = directories | PAGE_PRESENT | PAGE_WRITE
    pages = np.arange(gigabytes * 512, dtype=np.uint64) * TWO_MIB
    memory.view(PAGE_DIRECTORIES_START, 8 * len(pages), np.uint64)[:] = (
        pages | PAGE_PRESENT | PAGE_WRITE | PAGE_HUGE
    )


def _segment(
    segment: Cdata, selector: int, base: int, limit: int, type_: int, **flags: int
) -> None:
    segment.selector = selector
    segment.base = base
    segment.limit = limit
    segment.type = type_
    segment.present = 1
    segment.dpl = 0
    segment.s = 1
    segment.db = flags.get("db", 0)
    segment.l = flags.get("l", 0)
    segment.g = flags.get("g", 0)
    segment.avl = 0
    segment.unusable = 0


def _set_sregs(vcpu: Vcpu, mode: CpuMode, entry: int, gdt: int) -> None:
    sregs = vcpu.get_sregs()
    data_segments = (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss)
    if mode is CpuMode.REAL:
        selector = (entry >> 4) & 0xF000
        for segment in (sregs.cs, *data_segments):
            _segment(segment, selector, selector << 4, 0xFFFF, 3)
        sregs.cs.type = 11
        sregs.cr0 = CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
    else:
        long_mode = mode is CpuMode.LONG
        code = CODE64_SELECTOR if long_mode else CODE32_SELECTOR
        _segment(sregs.cs, code, 0, 0xFFFFFFFF, 11, g=1, l=int(long_mode), db=int(not long_mode))
        for segment in data_segments:
            _segment(segment, DATA_SELECTOR, 0, 0xFFFFFFFF, 3, g=1, db=1)
        sregs.gdt.base = gdt
        sregs.gdt.limit = 8 * len(GDT_ENTRIES) - 1
        # An empty IDT: any exception escalates to a triple fault, which pyvmm reports.
        sregs.idt.base = 0
        sregs.idt.limit = 0
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE
        sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.efer = 0
        if long_mode:
            sregs.cr0 |= CR0_WP | CR0_PG
            sregs.cr3 = PML4.start
            sregs.cr4 |= CR4_PAE
            sregs.efer = EFER_LME | EFER_LMA
    # A busy TSS: VMX refuses to enter without a usable TR, whatever the mode.
    sregs.tr.present = 1
    sregs.tr.type = 11
    sregs.tr.s = 0
    sregs.tr.limit = 0x67
    sregs.tr.unusable = 0
    vcpu.set_sregs(sregs)


def vcpu_cpuid(supported: Cdata, index: int) -> Cdata:
    """The supported CPUID with vCPU index as its APIC ID (leaves 0x1, 0xB and 0x1F).

    CPUID.1:ECX[31] (hypervisor) is set, as QEMU sets it on KVM: Linux reads the hypervisor
    leaves (0x40000000: KVM's signature and features, kvm-clock among them) only when it is,
    and KVM_GET_SUPPORTED_CPUID does not always report it (the rig's 6.12 does not; 6.18 does).
    As QEMU's -cpu host: leaf 0x5 ECX has EMX and IBE, and leaves 0x80000002-4 the host's
    brand string. docs/guest-abi.md lists what still differs from QEMU's model, and why.
    """
    brand = host_brand_string()
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": supported.nent, "entries": supported.nent})
    ffi.memmove(
        cpuid.entries, supported.entries, supported.nent * ffi.sizeof("struct kvm_cpuid_entry2")
    )
    for i in range(cpuid.nent):
        entry = cpuid.entries[i]
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x00FFFFFF) | (index << 24)
            entry.ecx |= CPUID_1_ECX_HYPERVISOR
        elif entry.function in (0xB, 0x1F):
            entry.edx = index
        elif entry.function == 5:
            entry.ecx |= CPUID_5_ECX_EMX_IBE
        elif entry.function in BRAND_LEAVES:
            offset = 16 * BRAND_LEAVES.index(entry.function)
            entry.eax, entry.ebx, entry.ecx, entry.edx = struct.unpack_from("<4I", brand, offset)
    return cpuid


def setup_vcpu(
    vcpu: Vcpu,
    mode: CpuMode,
    entry: int,
    index: int,
    count: int,
    supported_cpuid: Cdata,
    registers: Mapping[str, int] | None = None,
    gdt: int = BOOT_GDT.start,
) -> None:
    """Put a fresh vCPU at the guest's entry, in mode, with its index and the vCPU count.

    registers overrides general-purpose registers by kvm_regs field name, for boot protocols
    that pass more at entry (multiboot: {"rax": 0x2BADB002, "rbx": info address}); gdt is
    where write_boot_tables wrote the GDT.
    """
    vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, index))
    _set_sregs(vcpu, mode, entry, gdt)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "r8", "r9", "r10", "r11"):
        setattr(regs, name, 0)
    regs.rip = entry & 0xFFFF if mode is CpuMode.REAL else entry
    regs.rflags = 0x2
    regs.rdi = index
    regs.rsi = count
    for name, value in (registers or {}).items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)
    vcpu.set_msrs({MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_WB_ENABLED, **model_msrs()})


def setup_waiting_vcpu(vcpu: Vcpu, index: int, supported_cpuid: Cdata) -> None:
    """Give an application processor its CPUID and MTRRs, and leave it in its reset state.

    With the in-kernel LAPIC, KVM keeps every vCPU but the first waiting for INIT/SIPI
    (KVM_MP_STATE_UNINITIALIZED), as a PC's APs wait for the OS. INIT resets the registers,
    not CPUID or the MTRRs, so these are what the AP runs with once the guest starts it.
    """
    vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, index))
    vcpu.set_msrs({MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_WB_ENABLED, **model_msrs()})
