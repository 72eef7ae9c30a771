"""The PC memory map (BIOS int 15h, e820) that pyvmm hands to the kernels it boots.

Multiboot's memory map and the Linux boot protocol's e820 table are the same list: what a
PC's firmware reports for the machine's RAM. One function builds it for both.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.layout import VMX_IDENTITY_MAP, VMX_TSS
from pyvmm.memory import ECAM_BASE, ECAM_SIZE, HIGH_RAM_START, MIB, GuestMemory

E820_RAM = 1
E820_RESERVED = 2
#: The end of the usable conventional memory a PC's BIOS reports (the EBDA follows).
LOW_RAM_END = 0x9FC00


@dataclass(frozen=True)
class MemoryRange:
    """One entry of the memory map: [base, base + length) of a type (1: usable RAM)."""

    base: int
    length: int
    type: int


def memory_map(memory: GuestMemory) -> list[MemoryRange]:
    """The memory map a PC's BIOS reports (int 15h, e820) for pyvmm's RAM, by address.

    QEMU's is SeaBIOS's: usable RAM up to the EBDA at 0x9FC00, the BIOS area 0xF0000-0xFFFFF
    reserved, RAM from 1 MiB. On q35 it also reserves the PCIe MMCONFIG window, and under KVM
    the pages of Intel VMX's TSS and identity map; pyvmm has both, elsewhere (its ECAM at
    0xE0000000, its VMX pages at 0xFFFBC000). What pyvmm has no counterpart for is left out:
    SeaBIOS's own data at the top of low RAM, q35's chipset registers at 0xFED1C000 and the
    BIOS ROM at 0xFFFC0000. Like QEMU, the PCI memory window and the IOAPIC and local APIC
    pages are not listed: a gap is not RAM, and the OS finds the APICs in the ACPI tables.
    """
    low = memory.regions[0]
    ranges = [
        MemoryRange(0, LOW_RAM_END, E820_RAM),
        MemoryRange(LOW_RAM_END, 0xA0000 - LOW_RAM_END, E820_RESERVED),
        MemoryRange(0xF0000, 0x10000, E820_RESERVED),
    ]
    if low.end > MIB:
        ranges.append(MemoryRange(MIB, low.end - MIB, E820_RAM))
    vmx_start = min(VMX_IDENTITY_MAP.start, VMX_TSS.start)
    vmx_end = max(VMX_IDENTITY_MAP.end, VMX_TSS.end)
    ranges.append(MemoryRange(ECAM_BASE, ECAM_SIZE, E820_RESERVED))
    ranges.append(MemoryRange(vmx_start, vmx_end - vmx_start, E820_RESERVED))
    ranges += [
        MemoryRange(region.guest_phys_addr, region.size, E820_RAM)
        for region in memory.regions
        if region.guest_phys_addr >= HIGH_RAM_START
    ]
    return sorted(ranges, key=lambda r: r.base)
