"""Multiboot (version 1) boot, as QEMU's ``-kernel`` does it.

The Multiboot Specification 0.6.96 says how a boot loader finds, loads and enters a kernel;
QEMU's hw/i386/multiboot.c and its option ROM (pc-bios/optionrom/multiboot.S) say what a
kernel written against ``qemu-system-x86_64 -kernel K -append A -initrd "M1 ARGS,M2"`` gets.
pyvmm builds the same, without a BIOS:

1. The header (multiboot_header.py): magic 0x1BADB002, 4-byte aligned in the first 8192
   bytes of the file, with magic + flags + checksum == 0 (mod 2^32). Flag bits 0-15 are
   requirements: bit 0 (page-aligned modules) and bit 1 (memory information) are always met;
   bit 2 (a video mode) is ignored with a warning, as QEMU does; any other is refused, as
   the spec asks.
2. The image: an ELF32 file through pyvmm's ELF loader (by physical addresses), or, with
   flag bit 16 (the "a.out kludge"), the bytes the header's address fields describe, from any
   file. ELF64 without bit 16 is refused, as QEMU refuses it.
3. After the image, page-aligned: the module list, the module strings, the kernel's command
   line (its path, a space, then the --append text, as QEMU writes it) and the boot loader
   name; then each module, page-aligned, in the order given.
4. Below 1 MiB, where QEMU's option ROM puts them: the memory map at 0x9000 and the
   information structure at 0x9500. QEMU loads a kernel linked in conventional memory
   (0x500 to the EBDA) too, with the same layout after it; pyvmm then moves these two, and
   its boot GDT, out of the kernel's way (layout.place_low_region).
5. Entry: 32-bit protected mode, flat segments, paging and interrupts off, EAX = 0x2BADB002,
   EBX = the information structure (x86.py and boot.py do that part).

Every check runs before anything is written to guest RAM, and each failure is a
GuestImageError naming the file, the problem and the fix. docs/guest-abi.md ("Multiboot")
has the resulting memory layout.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvmm.e820 import LOW_RAM_END, MemoryRange, memory_map
from pyvmm.errors import ConfigurationError, GuestImageError
from pyvmm.imagefile import open_regular, read_regular
from pyvmm.layout import (
    BOOT_GDT,
    CONVENTIONAL_RAM,
    MULTIBOOT_INFO,
    MULTIBOOT_MMAP,
    Region,
    place_low_region,
)
from pyvmm.loader import PROTECTED_LOAD_MIN, LoadedImage, Segment, inspect_elf, load_elf
from pyvmm.memory import MIB, PAGE_SIZE, GuestMemory, describe_size
from pyvmm.multiboot_header import MultibootHeader, check_flags, raw_image

#: What the kernel finds in EAX: proof that a multiboot loader entered it.
BOOTLOADER_MAGIC = 0x2BADB002

# Information structure flags: what pyvmm fills in (QEMU's set).
INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9
INFO_FLAGS = (
    INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_BOOT_LOADER_NAME
)

#: Where QEMU's option ROM builds the memory map and the information structure (layout.py),
#: for any kernel not in their way; the structure follows the map at INFO_OFFSET wherever.
MMAP_ADDRESS = MULTIBOOT_MMAP.start
INFO_ADDRESS = MULTIBOOT_INFO.start
INFO_OFFSET = INFO_ADDRESS - MMAP_ADDRESS
#: A multiboot kernel may lie here, or in RAM from 1 MiB.
LOW_LOAD_RANGE = (CONVENTIONAL_RAM.start, CONVENTIONAL_RAM.end)
#: The fields up to the VBE ones, as QEMU writes them: flags ... vbe_interface_len.
INFO_SIZE = MULTIBOOT_INFO.size
#: BIOS drive 0x80 (the first hard disk), no partition: what QEMU reports.
BOOT_DEVICE = 0x8000FFFF
BOOT_LOADER_NAME = "pyvmm"

#: One memory map entry: size (of the rest, 20), base_addr, length, type.
_MMAP_ENTRY = struct.Struct("<IQQI")
MMAP_MAX_ENTRIES = (INFO_ADDRESS - MMAP_ADDRESS) // _MMAP_ENTRY.size
#: mod_start, mod_end (one past the last byte, as QEMU and GRUB), string, reserved.
_MODULE = struct.Struct("<IIII")


@dataclass(frozen=True)
class MultibootModule:
    """One module as placed in guest RAM."""

    path: Path
    string: str  #: its command line: the whole --initrd entry, file name first
    start: int
    end: int  #: one past its last byte
    string_address: int


@dataclass(frozen=True)
class MultibootInfo:
    """What load_multiboot put in guest RAM, and what the kernel is entered with."""

    image: LoadedImage
    header: MultibootHeader
    address: int  #: of the information structure: EBX at entry
    mmap_address: int
    gdt: Region  #: where the boot GDT goes (moved out of a low kernel's way)
    after_image: tuple[int, int]  #: [start, end) of the module list, strings and modules
    cmdline: str
    modules: tuple[MultibootModule, ...]
    memory_map: tuple[MemoryRange, ...]
    mem_lower: int  #: KiB
    mem_upper: int  #: KiB
    warnings: tuple[str, ...] = ()

    @property
    def regions(self) -> tuple[Region, ...]:
        """The boot GDT, memory map and information structure, where this boot put them."""
        return (
            self.gdt,
            Region(MULTIBOOT_MMAP.name, self.mmap_address, INFO_OFFSET),
            Region(MULTIBOOT_INFO.name, self.address, INFO_SIZE),
        )


def split_module_list(text: str) -> list[str]:
    """Split an --initrd value into module entries at commas, ",," standing for a comma.

    That is QEMU's option syntax for -initrd "mod1 arg1 arg2,mod2": each entry is a file
    name, optionally followed by a space and the module's arguments.
    """
    entries, current, index = [], [], 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text.startswith(",,", index):
                current.append(",")
                index += 2
                continue
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    entries.append("".join(current))
    return entries


def _check_in_ram(path: Path, memory: GuestMemory, start: int, end: int) -> None:
    low, high = LOW_LOAD_RANGE
    if low <= start and end <= high:
        return
    if start < PROTECTED_LOAD_MIN or not memory.contains(start, end - start):
        raise GuestImageError(
            f"{path}: the multiboot image [{start:#x}, {end:#x}) lies outside conventional "
            f"memory [{low:#x}, {high:#x}) and guest RAM above 1 MiB (RAM ends at "
            f"{memory.regions[0].end:#x} below the 3 GiB hole): relink the kernel or give it "
            "more --memory"
        )


def _place_structures(path: Path, occupied: Sequence[Region]) -> tuple[Region, Region]:
    """The memory map with the information structure after it, and the boot GDT: at their
    usual addresses, or clear of a kernel (and what follows it) below 1 MiB."""
    info = place_low_region("the multiboot boot information", INFO_OFFSET + INFO_SIZE,
                            MMAP_ADDRESS, occupied)  # fmt: skip
    gdt = None
    if info is not None:
        gdt = place_low_region(BOOT_GDT.name, BOOT_GDT.size, BOOT_GDT.start, [*occupied, info])
    if gdt is None:
        spans = ", ".join(f"[{r.start:#x}, {r.end:#x})" for r in occupied if r.size)
        raise GuestImageError(
            f"{path}: the kernel and its boot information ({spans}) leave no room in "
            f"conventional memory for the multiboot memory map and boot GDT "
            f"({INFO_OFFSET + INFO_SIZE + BOOT_GDT.size:#x} bytes): relink the kernel"
        )
    return info, gdt


def _read_modules(entries: Sequence[str], memory: GuestMemory) -> list[tuple[str, Path, bytes]]:
    modules = []
    for entry in entries:
        entry = os.fspath(entry)
        if "\0" in entry:
            raise ConfigurationError("a module entry has a NUL character: remove it")
        name = entry.split(" ", 1)[0]
        if not name:
            raise ConfigurationError(
                f"module entry {entry!r} has no file name: give FILE or 'FILE ARGS' per module"
            )
        path = Path(name)
        low = memory.regions[0].end
        data = read_regular(
            path, "multiboot module", low, f"RAM below the 3 GiB hole ({describe_size(low)})"
        )
        modules.append((entry, path, data))
    return modules


def _page_align(address: int) -> int:
    return (address + PAGE_SIZE - 1) & -PAGE_SIZE


def _cstring(text: str) -> bytes:
    return os.fsencode(text) + b"\0"


def load_multiboot(
    memory: GuestMemory,
    path: str | Path,
    header: MultibootHeader,
    *,
    append: str | bytes = "",
    modules: Sequence[str | Path] = (),
) -> MultibootInfo:
    """Load a multiboot kernel, its modules and its boot information into guest RAM.

    header is what find_header found in the file; append is the command line after the
    kernel's path; modules are "FILE" or "FILE ARGS" entries, loaded in order.
    """
    name = os.fspath(path)
    path = Path(path)
    # Bytes that are not UTF-8 travel as surrogate escapes: _cstring gives them back as typed.
    append = os.fsdecode(append)
    if "\0" in append:
        raise ConfigurationError("the --append text has a NUL character: remove it")
    warnings = check_flags(path, header)
    with open_regular(path, "guest image") as file:
        try:
            ident = file.read(5)  # ELF magic and class
        except OSError as error:
            raise GuestImageError(f"cannot read guest image {path}: {error.strerror}") from None
        file_size = os.fstat(file.fileno()).st_size
    raw = None
    if header.address_fields:
        raw = raw_image(path, header, file_size)
        start, end, entry = header.load_addr, raw.end, header.entry_addr
        _check_in_ram(path, memory, start, end)
    else:
        if ident[:4] != b"\x7fELF":
            raise GuestImageError(
                f"{path} has a multiboot header without the address fields (flag bit 16) and "
                "is not an ELF file: link it as ELF32 or fill in the address fields"
            )
        if ident[4:5] != b"\x01":
            raise GuestImageError(
                f"{path} is an ELF64 multiboot image: multiboot loads 32-bit ELF only (QEMU "
                "refuses it too: 'Cannot load x86-64 image, give a 32bit one'): link it as "
                "ELF32, or set flag bit 16 and the header's address fields"
            )
    loaded = _read_modules(modules, memory)
    cmdline = f"{name} {append}"  # QEMU's "%s %s": a trailing space when there is no append

    if raw is None:
        # The ELF loader's checks (every segment in RAM above 1 MiB, no overlap), and
        # where the image ends: the modules go after it.
        image = inspect_elf(memory, path, conventional=LOW_LOAD_RANGE)
        start = min(s.guest_phys_addr for s in image.segments)
        end = max(s.guest_phys_addr + s.memory_size for s in image.segments)
    else:
        image = LoadedImage(path, entry, 32, (Segment(start, raw.load_size, end - start),))

    # After the image, as QEMU: the module list, then the strings, then the modules.
    info_area = _page_align(end)
    strings_at = info_area + _MODULE.size * len(loaded)
    strings = bytearray()

    def add_string(text: str) -> int:
        address = strings_at + len(strings)
        strings.extend(_cstring(text))
        return address

    module_strings = [add_string(entry) for entry, _, _ in loaded]
    cmdline_address = add_string(cmdline)
    loader_name_address = add_string(BOOT_LOADER_NAME)
    placed, at = [], _page_align(strings_at + len(strings))
    for (entry, module_path, data), string_address in zip(loaded, module_strings, strict=True):
        placed.append(MultibootModule(module_path, entry, at, at + len(data), string_address))
        at = _page_align(at + len(data))
    top = max(strings_at + len(strings), placed[-1].end if placed else 0)
    if not memory.contains(info_area, top - info_area):
        raise GuestImageError(
            f"the multiboot modules and boot information need RAM up to {top:#x} after the "
            f"kernel, but RAM below the 3 GiB hole ends at {memory.regions[0].end:#x}: "
            "give the guest more --memory or smaller modules"
        )
    if info_area < MIB and top > CONVENTIONAL_RAM.end:
        raise GuestImageError(
            f"the multiboot modules and boot information need conventional memory up to "
            f"{top:#x} after the kernel, past its end at {CONVENTIONAL_RAM.end:#x} (the EBDA): "
            "link the kernel at or above 1 MiB, or use smaller modules"
        )
    after = Region("the module list, strings and modules", info_area, top - info_area)
    block, gdt = _place_structures(path, [Region("the kernel", start, end - start), after])
    mmap_address, info_address = block.start, block.start + INFO_OFFSET

    mmap = memory_map(memory)
    if len(mmap) > MMAP_MAX_ENTRIES:  # cannot happen with pyvmm's RAM layout; a guard
        raise ConfigurationError(
            f"{len(mmap)} memory map entries do not fit below {INFO_ADDRESS:#x}"
        )
    mem_lower = LOW_RAM_END // 1024
    mem_upper = (memory.regions[0].end - MIB) // 1024 if memory.regions[0].end > MIB else 0

    # Everything is checked: write.
    if raw is None:
        load_elf(memory, path, conventional=LOW_LOAD_RANGE)
    else:
        with open_regular(path, "guest image") as file:
            memory.load_from_file(file, raw.file_offset, start, raw.load_size)
        memory.fill(start + raw.load_size, end - start - raw.load_size)
    memory.fill(info_area, top - info_area)
    for index, module in enumerate(placed):
        memory.write(
            info_area + _MODULE.size * index,
            _MODULE.pack(module.start, module.end, module.string_address, 0),
        )
        memory.write(module.start, loaded[index][2])
    memory.write(strings_at, strings)
    memory.fill(block.start, block.size)
    memory.write(
        mmap_address,
        b"".join(_MMAP_ENTRY.pack(_MMAP_ENTRY.size - 4, r.base, r.length, r.type) for r in mmap),
    )
    info = bytearray(INFO_SIZE)
    struct.pack_into(
        "<7I", info, 0, INFO_FLAGS, mem_lower, mem_upper, BOOT_DEVICE, cmdline_address,
        len(placed), info_area,
    )  # fmt: skip
    struct.pack_into("<II", info, 44, _MMAP_ENTRY.size * len(mmap), mmap_address)
    struct.pack_into("<I", info, 64, loader_name_address)
    memory.write(info_address, info)
    return MultibootInfo(
        image=image,
        header=header,
        address=info_address,
        mmap_address=mmap_address,
        gdt=gdt,
        after_image=(info_area, top),
        cmdline=cmdline,
        modules=tuple(placed),
        memory_map=tuple(mmap),
        mem_lower=mem_lower,
        mem_upper=mem_upper,
        warnings=warnings,
    )
