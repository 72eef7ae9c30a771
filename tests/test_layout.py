"""The low-memory layout has one owner (pyvmm/layout.py): nothing overlaps whatever the page
tables must map, the DSDT's windows hold every BAR pyvmm places, and Linux's placement
checks use the window the kernel decompresses into. Guests run on the real /dev/kvm.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvmm import Machine
from pyvmm.acpi import build_dsdt
from pyvmm.errors import ConfigurationError, GuestImageError
from pyvmm.layout import (
    BOOT_GDT,
    CONVENTIONAL_RAM,
    FIRMWARE_WORK_AREA,
    HIGH_WINDOW_SIZE,
    LINUX_COMMAND_LINE,
    LINUX_ZERO_PAGE,
    MULTIBOOT_INFO,
    MULTIBOOT_MMAP,
    PAGE_DIRECTORIES_START,
    PROTOCOL_REGIONS,
    Region,
    boot_regions,
    check_layout,
    high_window,
    max_identity_map_gib,
    place_low_region,
    plan_identity_map,
)
from pyvmm.linux import KERNEL_LOAD_ADDRESS, decompression_window, load_linux
from pyvmm.memory import GIB, MIB, GuestMemory
from pyvmm.pci.resources import PciResources
from tests.test_linux import bzimage
from tests.test_multiboot import aout_kernel

#: Every guest here ends at once; this is a generous bound for the software KVM.
TIMEOUT = 60
SIXTEEN_GIB = 16 * GIB
#: Where pyvmm places a 16 GiB 64-bit BAR with little RAM: the window starts at 4 GiB, the
#: BAR is naturally aligned.
BAR_ADDRESS = SIXTEEN_GIB
#: What the emulated BAR answers: the stand-in kernel exits with it.
BAR_VALUE = 0x2A


def bar_reading_kernel(address: int) -> bytes:
    """The stand-in kernel: 0x200 bytes to the 64-bit entry, then mov rax, address;
    mov eax, [rax]; out 0xF4, al (exit status (value << 1) | 1); hlt."""
    code = b"\x48\xb8" + struct.pack("<Q", address) + bytes.fromhex("8b00" "e6f4" "f4")
    return (b"\x90" * 0x200 + code).ljust(4096, b"\xf4")


class Bar64Function:
    """An emulated PCI function with one 64-bit memory BAR (BAR0/BAR1) at a given address."""

    def __init__(self, address: int) -> None:
        self.space = bytearray(256)
        struct.pack_into("<HH", self.space, 0, 0x1234, 0x5678)
        struct.pack_into("<II", self.space, 0x10, (address & 0xFFFFFFF0) | 0x4, address >> 32)

    def config_read(self, offset: int, size: int) -> int:
        """The function's configuration space, read-only."""
        return int.from_bytes(self.space[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Writes are ignored: the BAR stays where pyvmm placed it."""


class BarRegisters:
    """The BAR's contents: every read answers BAR_VALUE; counts the reads."""

    def __init__(self) -> None:
        self.reads: list[int] = []

    def __call__(self, offset: int, data: memoryview, is_write: bool) -> None:
        if not is_write:
            self.reads.append(offset)
            data[:] = BAR_VALUE.to_bytes(len(data), "little")


# ---- the layout itself ---------------------------------------------------------------------
@pytest.mark.parametrize("protocol", sorted(PROTOCOL_REGIONS))
def test_no_region_overlaps_for_any_map_the_page_tables_can_take(protocol: str) -> None:
    limit = max_identity_map_gib(protocol)
    for gigabytes in range(1, limit + 1):
        check_layout(boot_regions(protocol, gigabytes))
    # One GiB more reaches the next region: refused, naming the limit.
    with pytest.raises(ConfigurationError, match=f"more than the {limit} GiB"):
        plan_identity_map(protocol, (limit + 1) * GIB)


@pytest.mark.parametrize("protocol", ["elf", "linux"])
@pytest.mark.parametrize("ram", [64 * MIB, 3 * GIB, 8 * GIB, 100 * GIB, 150 * GIB])
@pytest.mark.parametrize("bar", [0, 2 * MIB, GIB, SIXTEEN_GIB, HIGH_WINDOW_SIZE // 2])
def test_ram_and_the_highest_bar_are_mapped_or_refused(protocol: str, ram: int, bar: int) -> None:
    """Every RAM size and 64-bit BAR pyvmm can place: the map fits without overlapping a
    region, or plan_identity_map refuses; never silent corruption."""
    ram_top = ram if ram <= 3 * GIB else ram + GIB  # the PCI hole moves the rest above 4 GiB
    resources = PciResources(ram_top)
    if bar:
        resources.memory(bar, True)
    needed = max(4 * GIB, ram_top, resources.high_top)
    try:
        gigabytes = plan_identity_map(protocol, ram_top, resources.high_top)
    except ConfigurationError as error:
        assert "boot page tables map" in str(error)
        assert -(-needed // GIB) > max_identity_map_gib(protocol)
        return
    assert gigabytes * GIB >= needed
    check_layout(boot_regions(protocol, gigabytes))


def test_an_overlap_made_on_purpose_is_refused() -> None:
    zero_page = Region("the zero page", 0x80000, 0x1000)
    intruder = Region("an intruder", 0x80FFF, 2)
    with pytest.raises(ConfigurationError, match="overlaps an intruder"):
        check_layout([Region("below", 0x1000, 0x1000), zero_page, intruder])
    # A region inside a bigger one, not adjacent by start to anything else, is found too.
    with pytest.raises(ConfigurationError, match="overlaps"):
        check_layout([Region("big", 0, 0x10000), Region("a", 0x100, 1), Region("b", 0x8000, 1)])
    check_layout([Region("a", 0, 0x1000), Region("b", 0x1000, 0x1000)])  # touching is fine


def test_a_16_gib_bar_map_stays_clear_of_the_linux_and_multiboot_areas() -> None:
    """The bug: a 16 GiB 64-bit BAR grew the page directories over the zero page."""
    resources = PciResources(64 * MIB)
    assert resources.memory(SIXTEEN_GIB, True) == SIXTEEN_GIB  # naturally aligned
    gigabytes = plan_identity_map("linux", 64 * MIB, resources.high_top)
    assert gigabytes == 32
    directories_end = PAGE_DIRECTORIES_START + gigabytes * 4096
    assert directories_end <= LINUX_ZERO_PAGE.start
    assert directories_end <= LINUX_COMMAND_LINE.start


# ---- the DSDT's windows and the BAR allocator ----------------------------------------------
def crs_memory_windows(dsdt: bytes) -> list[tuple[int, int]]:
    """[min, max] of every DWordMemory and QWordMemory descriptor in the DSDT."""
    windows = []
    at = dsdt.find(b"\x87\x17\x00")
    while at >= 0:
        windows.append(struct.unpack_from("<II", dsdt, at + 10))
        at = dsdt.find(b"\x87\x17\x00", at + 1)
    at = dsdt.find(b"\x8a\x2b\x00")
    while at >= 0:
        windows.append(struct.unpack_from("<QQ", dsdt, at + 14))
        at = dsdt.find(b"\x8a\x2b\x00", at + 1)
    return windows


@pytest.mark.parametrize("ram_top", [64 * MIB, 3 * GIB, 6 * GIB, 6 * GIB + 1, 65 * GIB])
def test_every_placed_bar_lies_in_a_window_the_dsdt_declares(ram_top: int) -> None:
    windows = crs_memory_windows(build_dsdt(1, ram_top))
    assert len(windows) == 2
    resources = PciResources(ram_top)
    bars = [(resources.memory(size, is_64), size) for size, is_64 in (
        (0x1000, False), (64 * MIB, False), (128 * MIB, True), (SIXTEEN_GIB, True),
        (GIB, True),
    )]  # fmt: skip
    assert any(size == SIXTEEN_GIB and base >= 4 * GIB for base, size in bars)
    for base, size in bars:
        assert any(low <= base and base + size - 1 <= high for low, high in windows), hex(base)
    assert windows[1] == (high_window(ram_top)[0], high_window(ram_top)[1] - 1)


def test_a_64_bit_bar_past_the_window_is_refused() -> None:
    resources = PciResources(64 * MIB)
    resources.memory(SIXTEEN_GIB, True)
    with pytest.raises(ConfigurationError, match="does not fit in the 64-bit PCI window"):
        resources.memory(SIXTEEN_GIB * 2, True)


# ---- Linux: the decompression window -------------------------------------------------------
def linux_image(*, pref_address: int, alignment: int, relocatable: bool, init_size: int) -> bytes:
    image = bytearray(bzimage(init_size=init_size))
    struct.pack_into("<IB", image, 0x230, alignment, int(relocatable))
    struct.pack_into("<Q", image, 0x258, pref_address)
    return bytes(image)


@pytest.mark.parametrize(
    ("pref_address", "alignment", "relocatable", "start"),
    [
        (16 * MIB, 2 * MIB, True, 16 * MIB),  # the usual x86_64 kernel: runs at pref_address
        (16 * MIB + 0x1000, 2 * MIB, True, 18 * MIB),  # aligned up to kernel_alignment
        (0, 2 * MIB, True, 2 * MIB),  # no pref_address: the load address, aligned up
        (0, 0x1000, True, KERNEL_LOAD_ADDRESS),
        (16 * MIB + 0x1000, 2 * MIB, False, 16 * MIB + 0x1000),  # fixed: no alignment
        (0, 2 * MIB, False, KERNEL_LOAD_ADDRESS),
    ],
)
def test_decompression_window(pref_address, alignment, relocatable, start) -> None:
    image = linux_image(pref_address=pref_address, alignment=alignment,
                        relocatable=relocatable, init_size=8 * MIB)  # fmt: skip
    assert decompression_window(image) == (start, start + 8 * MIB)


@pytest.fixture
def memory():
    memory = GuestMemory("64M")
    yield memory
    memory.close()


def test_ram_too_small_for_init_size_at_pref_address(tmp_path: Path, memory) -> None:
    """40 MiB of init_size fits above 1 MiB in 64 MiB, but not from pref_address 32 MiB."""
    path = tmp_path / "bzImage"
    path.write_bytes(linux_image(pref_address=32 * MIB, alignment=2 * MIB, relocatable=True,
                                 init_size=40 * MIB))  # fmt: skip
    with pytest.raises(GuestImageError, match=r"runs from 0x2000000 .* 0x2800000 bytes") as info:
        load_linux(memory, path, "")
    assert "up to 0x4800000" in str(info.value) and "at least 73 MiB" in str(info.value)
    path.write_bytes(linux_image(pref_address=16 * MIB, alignment=2 * MIB, relocatable=True,
                                 init_size=40 * MIB))  # fmt: skip
    load_linux(memory, path, "")


def test_an_initrd_that_would_overlap_the_decompression_window(tmp_path: Path, memory) -> None:
    """From pref_address 16 MiB, 40 MiB of init_size ends at 56 MiB: a 12 MiB initrd below
    64 MiB would reach into it (from 1 MiB it would not)."""
    path = tmp_path / "bzImage"
    path.write_bytes(linux_image(pref_address=16 * MIB, alignment=2 * MIB, relocatable=True,
                                 init_size=40 * MIB))  # fmt: skip
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\xa5" * 12 * MIB)
    window_end = "end of the kernel's decompression window 0x3800000"
    with pytest.raises(GuestImageError, match=window_end):
        load_linux(memory, path, "", initrd=initrd)
    initrd.write_bytes(b"\xa5" * 6 * MIB)
    loaded = load_linux(memory, path, "", initrd=initrd)
    assert loaded.initrd[0] >= 56 * MIB and loaded.initrd[0] + 6 * MIB <= 64 * MIB


# ---- real guests with a 16 GiB 64-bit BAR --------------------------------------------------
def test_linux_boot_with_a_16_gib_bar_keeps_the_zero_page_and_command_line(
    kvm_required, tmp_path: Path
) -> None:
    """The page tables grow to map the BAR (the kernel reads its last dword through them),
    and the zero page and command line, written before them, are intact."""
    last_dword = BAR_ADDRESS + SIXTEEN_GIB - 4
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(kernel=bar_reading_kernel(last_dword)))
    cmdline = "console=ttyS0 " + "x" * 1500
    registers = BarRegisters()
    with Machine(memory="64M", serial="capture") as machine:
        machine.load(path, append=cmdline)
        zero_page = machine.memory.read(LINUX_ZERO_PAGE.start, LINUX_ZERO_PAGE.size)
        bar = machine.place_memory_bar(SIXTEEN_GIB, True)
        assert bar == BAR_ADDRESS
        machine.add_pci_function(Bar64Function(bar))
        machine.add_mmio(bar, SIXTEEN_GIB, registers, "16 GiB BAR0")
        result = machine.run(timeout=TIMEOUT)
        assert result.exit_status == (BAR_VALUE << 1) | 1, result.message
        assert registers.reads == [SIXTEEN_GIB - 4]
        # run() wrote the page tables for [0, 32 GiB) after the zero page and command line.
        last = bar + SIXTEEN_GIB - 2 * MIB
        directory_entry = PAGE_DIRECTORIES_START + (last >> 21) * 8
        entry = struct.unpack("<Q", machine.memory.read(directory_entry, 8))[0]
        assert entry & ~0x60 == last | 0x83  # present, writable, 2 MiB (the CPU sets A/D)
        assert machine.memory.read(LINUX_ZERO_PAGE.start, LINUX_ZERO_PAGE.size) == zero_page
        line = machine.memory.read(LINUX_COMMAND_LINE.start, len(cmdline) + 1)
        assert line == cmdline.encode() + b"\0"


def test_multiboot_boot_with_a_16_gib_bar_keeps_its_information(
    kvm_required, tmp_path: Path
) -> None:
    path = aout_kernel(tmp_path / "kernel.bin")
    with Machine(memory="64M", serial="capture") as machine:
        machine.load(path, append="multiboot cmdline")
        info_area = (MULTIBOOT_MMAP.start, MULTIBOOT_INFO.end - MULTIBOOT_MMAP.start)
        before = machine.memory.read(*info_area)
        machine.add_pci_function(Bar64Function(machine.place_memory_bar(SIXTEEN_GIB, True)))
        result = machine.run(timeout=TIMEOUT)
        assert result.exit_status % 2 == 0, result.message  # powered off, not a guest error
        assert machine.memory.read(*info_area) == before
        assert before != bytes(len(before))


def test_linux_through_the_firmware_with_a_16_gib_bar(kvm_required, tmp_path: Path) -> None:
    """The firmware builds the same identity map (32 GiB: to the BAR's end) from the record,
    and the kernel it enters reads the BAR through it."""
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(kernel=bar_reading_kernel(BAR_ADDRESS + 8)))
    registers = BarRegisters()
    with Machine(memory="64M", serial="capture", firmware=True) as machine:
        machine.load(path, append="console=ttyS0")
        bar = machine.place_memory_bar(SIXTEEN_GIB, True)
        machine.add_pci_function(Bar64Function(bar))
        machine.add_mmio(bar, SIXTEEN_GIB, registers, "16 GiB BAR0")
        result = machine.run(timeout=TIMEOUT)
        assert result.exit_status == (BAR_VALUE << 1) | 1, result.serial_text + result.message
        assert registers.reads == [8]
        line = machine.memory.read(LINUX_COMMAND_LINE.start, 14)
        assert line == b"console=ttyS0\0"


# ---- structures moved out of a low multiboot kernel's way (layout.place_low_region) ----


def test_low_region_stays_at_its_usual_address_when_free() -> None:
    kernel = Region("kernel", 0x10000, 0x5000)
    assert place_low_region("x", 0x558, 0x9000, [kernel]) == Region("x", 0x9000, 0x558)


def test_low_region_moves_to_the_lowest_gap_outside_the_firmware_area() -> None:
    kernel = Region("kernel", 0x8000, 0x6000)  # over 0x9000
    assert place_low_region("x", 0x558, 0x9000, [kernel]).start == CONVENTIONAL_RAM.start
    # [0x500, 0x1000) too small: past the firmware's area and the kernel, aligned.
    first = Region("first", 0x900, 0x200)
    placed = place_low_region("x", 0x558, 0x9000, [kernel, first])
    assert placed.start == 0xE000
    assert not placed.overlaps(FIRMWARE_WORK_AREA)


def test_low_region_none_when_nothing_fits() -> None:
    everything = Region("kernel", CONVENTIONAL_RAM.start, CONVENTIONAL_RAM.size - 0x100)
    assert place_low_region("x", 0x558, 0x9000, [everything]) is None


def test_boot_regions_with_placed_regions_replace_the_gdt_and_protocol_regions() -> None:
    gdt = Region("the boot GDT", 0x500, 32)
    mmap = Region("map", 0x520, 0x500)
    regions = boot_regions("multiboot", 0, (gdt, mmap))
    assert BOOT_GDT not in regions and MULTIBOOT_MMAP not in regions
    assert gdt in regions and mmap in regions
    check_layout(regions)
