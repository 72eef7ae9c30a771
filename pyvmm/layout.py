"""The guest-physical layout: every fixed address pyvmm places something at, in one table.

Below 1 MiB (docs/guest-abi.md's memory map):

    0x1000   the boot GDT; the firmware's data (0x1020), boot record (0x1100) and stack (0x1F00)
    0x2000   the PML4, 0x3000 the PDPT
    0x4000   the page directories: one per GiB the identity map covers, growing up
    0x9000   multiboot: the memory map, then the information structure at 0x9500
             (both, and the GDT, move out of the way of a kernel linked below 1 MiB:
             place_low_region())
    0x80000  Linux: the zero page, the boot GDT at 0x81000, the command line at 0x82000
    0xE0000  the ACPI tables (RSDP first), 0xF0000 the MP table

Near 4 GiB: Intel VMX's identity map and real-mode TSS, and the firmware ROM.

The page directories are the one region whose size depends on the machine: they must map
RAM and every BAR placed above it. plan_identity_map() sizes them and refuses, with the
limit, a map that would reach the next region the boot protocol uses; check_layout() proves
no two regions overlap. The 64-bit PCI window (HIGH_WINDOW_SIZE) is defined here too, so
the BAR allocator and the DSDT that declares the window cannot disagree.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from pyvmm.errors import ConfigurationError
from pyvmm.memory import GIB, HIGH_RAM_START, PAGE_SIZE


@dataclass(frozen=True)
class Region:
    """A guest-physical range pyvmm reserves for one purpose."""

    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        """One past the region's last byte."""
        return self.start + self.size

    def overlaps(self, other: Region) -> bool:
        """Whether the two regions share a byte."""
        return self.start < other.end and other.start < self.end


BOOT_GDT = Region("the boot GDT", 0x1000, 32)
#: The firmware's fw_cfg DMA structure, the kernel's GDTR, its GO flag and a directory entry.
FIRMWARE_DATA = Region("the firmware's data", 0x1020, 0xE0)
FIRMWARE_RECORD = Region("the firmware's boot record", 0x1100, 0xE00)
FIRMWARE_STACK = Region("the firmware's stack", 0x1F00, 0x100)
#: The firmware's boot page: the GDT, its record and its stack (firmware/pyvmm-fw.S).
BOOT_PAGE = 0x1000
PML4 = Region("the PML4", 0x2000, PAGE_SIZE)
PDPT = Region("the PDPT", 0x3000, PAGE_SIZE)
#: The first page directory; firmware/pyvmm-fw.S builds its map from here too.
PAGE_DIRECTORIES_START = 0x4000
#: Conventional memory ends here (the EBDA, then the legacy VGA hole): the page directories
#: never reach past it.
CONVENTIONAL_END = 0xA0000
#: One PDPT: 512 GiB at most, whatever room there is for page directories.
PDPT_ENTRIES = 512

MULTIBOOT_MMAP = Region("the multiboot memory map", 0x9000, 0x500)
MULTIBOOT_INFO = Region("the multiboot information structure", 0x9500, 88)

#: Conventional memory a multiboot kernel may load into: above the real-mode IVT and the
#: BIOS data area, below the EBDA the memory map reserves at 0x9FC00.
CONVENTIONAL_RAM = Region("conventional memory", 0x500, 0x9FC00 - 0x500)
#: What pyvmm's own low structures never move into: the firmware's boot page and the page
#: tables it builds for 4 GiB (firmware/pyvmm-fw.S), so that a structure moved for a low
#: kernel is at the same address with and without --firmware. Their usual places (the GDT
#: at 0x1000) are inside; only a moved structure keeps out.
FIRMWARE_WORK_AREA = Region("the firmware's RAM and page tables", 0x1000, 0x7000)
#: Alignment of a moved structure.
LOW_REGION_ALIGN = 16

LINUX_ZERO_PAGE = Region("the Linux zero page", 0x80000, PAGE_SIZE)
LINUX_GDT_REGION = Region("the Linux boot GDT", 0x81000, 32)
LINUX_COMMAND_LINE = Region("the Linux command line", 0x82000, 0x10000)

ACPI_TABLES = Region("the ACPI tables", 0xE0000, 0x10000)
RSDP_ADDRESS = ACPI_TABLES.start
#: 64-byte aligned, as the spec requires.
FACS_ADDRESS = 0xE0040
ACPI_TABLES_START = 0xE0080
MP_TABLE = Region("the MP table", 0xF0000, 0x10000)
MP_CONFIG_TABLE_ADDRESS = 0xF0010

#: Where Intel VMX keeps its identity map and real-mode TSS (3 pages): just below the BIOS
#: area, as QEMU. KVM uses them only for real mode on hosts without unrestricted guests.
VMX_IDENTITY_MAP = Region("the VMX identity map", 0xFFFBC000, PAGE_SIZE)
VMX_TSS = Region("the VMX real-mode TSS", 0xFFFBD000, 3 * PAGE_SIZE)
FIRMWARE_ROM = Region("the firmware ROM", 0xFFFF0000, 0x10000)

#: The 64-bit PCI window: from the first GiB boundary at or above max(4 GiB, RAM top), this
#: long. The BAR allocator places 64-bit BARs in it and the DSDT declares it.
HIGH_WINDOW_SIZE = 32 * GIB

#: What every guest may have in low memory besides its protocol's own regions.
COMMON_REGIONS = (
    BOOT_GDT, FIRMWARE_DATA, FIRMWARE_RECORD, FIRMWARE_STACK, PML4, PDPT, ACPI_TABLES, MP_TABLE,
    VMX_IDENTITY_MAP, VMX_TSS, FIRMWARE_ROM,
)  # fmt: skip
#: Each boot protocol's own regions (boot.BootProtocol's values).
PROTOCOL_REGIONS: dict[str, tuple[Region, ...]] = {
    "elf": (),
    "multiboot": (MULTIBOOT_MMAP, MULTIBOOT_INFO),
    "linux": (LINUX_ZERO_PAGE, LINUX_GDT_REGION, LINUX_COMMAND_LINE),
}


def high_window(ram_top: int) -> tuple[int, int]:
    """The 64-bit PCI window [start, end) for a guest whose RAM ends at ram_top."""
    start = (max(HIGH_RAM_START, ram_top) + GIB - 1) & ~(GIB - 1)
    return start, start + HIGH_WINDOW_SIZE


def page_directories(gigabytes: int) -> Region:
    """The page directories of an identity map of gigabytes GiB."""
    return Region(f"the page directories for {gigabytes} GiB", PAGE_DIRECTORIES_START,
                  gigabytes * PAGE_SIZE)  # fmt: skip


def identity_map_gib(ram_top: int, device_top: int = 0) -> int:
    """GiB the long-mode identity map covers: [0, max(4 GiB, RAM top, device top))."""
    return max(4 * GIB, ram_top + GIB - 1, device_top + GIB - 1) // GIB


def max_identity_map_gib(protocol: str) -> int:
    """The most GiB the page directories can map without reaching protocol's regions."""
    above = [r.start for r in (*COMMON_REGIONS, *PROTOCOL_REGIONS[protocol])
             if r.start >= PAGE_DIRECTORIES_START]  # fmt: skip
    limit = min([CONVENTIONAL_END, *above])
    return min((limit - PAGE_DIRECTORIES_START) // PAGE_SIZE, PDPT_ENTRIES)


def plan_identity_map(protocol: str, ram_top: int, device_top: int = 0) -> int:
    """GiB of identity map a protocol's guest needs, checked against the layout.

    Raises ConfigurationError naming the limit when the page directories would not fit.
    """
    gigabytes = identity_map_gib(ram_top, device_top)
    limit = max_identity_map_gib(protocol)
    if gigabytes > limit:
        raise ConfigurationError(
            f"the guest-physical space to map is {gigabytes} GiB (RAM and BARs), more than "
            f"the {limit} GiB pyvmm's boot page tables map for {protocol} guests: lower "
            "--memory or assign smaller devices"
        )
    check_layout(boot_regions(protocol, gigabytes))
    return gigabytes


def boot_regions(
    protocol: str, map_gib: int, placed: tuple[Region, ...] | None = None
) -> tuple[Region, ...]:
    """Every region a protocol's guest has, with an identity map of map_gib GiB (0: none).

    placed: the boot GDT and the protocol's regions where this boot put them (a multiboot
    kernel below 1 MiB moves them), instead of their usual places.
    """
    tables = (page_directories(map_gib),) if map_gib else ()
    if placed is None:
        return (*COMMON_REGIONS, *tables, *PROTOCOL_REGIONS[protocol])
    common = tuple(region for region in COMMON_REGIONS if region is not BOOT_GDT)
    return (*common, *tables, *placed)


def place_low_region(name: str, size: int, usual: int, occupied: Iterable[Region]) -> Region | None:
    """Where a structure of pyvmm's goes in conventional memory, clear of occupied.

    At its usual address if that is free (QEMU's addresses: kernels linked at 1 MiB see
    no change), else at the lowest LOW_REGION_ALIGN-aligned address in CONVENTIONAL_RAM
    outside FIRMWARE_WORK_AREA and every occupied region; None if there is none.
    """
    occupied = [region for region in occupied if region.size]
    at_usual = Region(name, usual, size)
    if not any(at_usual.overlaps(region) for region in occupied):
        return at_usual
    blocked = sorted([*occupied, FIRMWARE_WORK_AREA], key=lambda region: region.start)
    candidate = CONVENTIONAL_RAM.start
    for region in blocked:
        if candidate + size <= region.start:
            break
        if region.end > candidate:
            candidate = -(-region.end // LOW_REGION_ALIGN) * LOW_REGION_ALIGN
    if candidate + size > CONVENTIONAL_RAM.end:
        return None
    return Region(name, candidate, size)


def check_layout(regions: Iterable[Region]) -> None:
    """Raise ConfigurationError if any two regions overlap (a bug in the layout, or a size
    past its limit)."""
    ordered = sorted(regions, key=lambda region: region.start)
    for lower, upper in itertools.pairwise(ordered):
        if lower.overlaps(upper):
            raise ConfigurationError(
                f"guest layout: {lower.name} [{lower.start:#x}, {lower.end:#x}) overlaps "
                f"{upper.name} [{upper.start:#x}, {upper.end:#x})"
            )
