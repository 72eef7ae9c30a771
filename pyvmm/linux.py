"""The Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry: a bzImage as
QEMU's -kernel/-append/-initrd boots it, without a BIOS.

What a boot loader does, done here:

1. Read the setup header at 0x1F1 of the bzImage ("HdrS", protocol 2.12 or later, a 64-bit
   entry point: XLF_KERNEL_64) and copy it into a zeroed ``struct boot_params`` (the "zero
   page"), then fill in what the loader owns: type_of_loader, loadflags, the command line
   pointer, the initrd, and the e820 memory map.
2. Load the protected-mode kernel (everything after the real-mode setup sectors) at 1 MiB,
   and check RAM holds the window it decompresses into: init_size bytes from its runtime
   start (pref_address; for a relocatable kernel the load address aligned up to
   kernel_alignment, if that is higher).
3. Put the initrd as high as initrd_addr_max and RAM below the PCI hole allow, above that
   window.
4. Enter at load address + 0x200 in 64-bit mode, paging on with an identity map, CS =
   __BOOT_CS (0x10) and DS/ES/SS = __BOOT_DS (0x18) from a GDT that describes them,
   interrupts off, RSI = the zero page.

The real-mode setup code is never run: it would need a BIOS, which pyvmm does not have.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyvmm.e820 import memory_map
from pyvmm.errors import GuestImageError
from pyvmm.imagefile import read_regular
from pyvmm.kvm import Vcpu
from pyvmm.layout import LINUX_COMMAND_LINE, LINUX_GDT_REGION, LINUX_ZERO_PAGE
from pyvmm.memory import MIB, PAGE_SIZE, GuestMemory, describe_size

SETUP_HEADER = 0x1F1
HDRS_MAGIC = 0x53726448  # "HdrS"
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, and with it the 64-bit entry
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
TYPE_OF_LOADER_UNDEFINED = 0xFF  # no assigned loader ID

KERNEL_LOAD_ADDRESS = 0x100000
#: Where pyvmm puts the zero page, the command line and the GDT Linux asks for (layout.py).
ZERO_PAGE = LINUX_ZERO_PAGE.start
COMMAND_LINE = LINUX_COMMAND_LINE.start
COMMAND_LINE_MAX = LINUX_COMMAND_LINE.size
LINUX_GDT = LINUX_GDT_REGION.start
BOOT_CS, BOOT_DS = 0x10, 0x18
#: null, null, __BOOT_CS: 64-bit code, __BOOT_DS: flat data.
LINUX_GDT_ENTRIES = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)

# Offsets in struct boot_params (arch/x86/include/uapi/asm/bootparam.h).
EXT_RAMDISK_IMAGE, EXT_RAMDISK_SIZE, EXT_CMD_LINE_PTR = 0x0C0, 0x0C4, 0x0C8
E820_ENTRIES, E820_TABLE, E820_MAX = 0x1E8, 0x2D0, 128
# Offsets of setup header fields, in the image and in boot_params alike.
SETUP_SECTS, BOOT_FLAG, HEADER, VERSION = 0x1F1, 0x1FE, 0x202, 0x206
TYPE_OF_LOADER, LOADFLAGS, RAMDISK_IMAGE, RAMDISK_SIZE = 0x210, 0x211, 0x218, 0x21C
HEAP_END_PTR, CMD_LINE_PTR, INITRD_ADDR_MAX = 0x224, 0x228, 0x22C
KERNEL_ALIGNMENT, RELOCATABLE_KERNEL = 0x230, 0x234
XLOADFLAGS, CMDLINE_SIZE, PREF_ADDRESS, INIT_SIZE = 0x236, 0x238, 0x258, 0x260


@dataclass(frozen=True)
class LinuxImage:
    """A loaded bzImage: where it runs and what it was given."""

    path: Path
    entry: int
    zero_page: int
    load_address: int  #: where the protected-mode kernel is
    kernel_size: int
    protocol: int
    initrd: tuple[int, int] | None  #: (address, size)


def is_bzimage(head: bytes) -> bool:
    """Whether the first bytes of a file are a bzImage's boot sector and setup header."""
    return (
        len(head) >= HEADER + 4
        and struct.unpack_from("<I", head, HEADER)[0] == HDRS_MAGIC
        and struct.unpack_from("<H", head, BOOT_FLAG)[0] == 0xAA55
    )


def _fail(path: Path, problem: str) -> GuestImageError:
    return GuestImageError(f"{path}: {problem}")


def load_linux(
    memory: GuestMemory,
    path: str | Path,
    cmdline: str | bytes = "",
    initrd: str | Path | None = None,
) -> LinuxImage:
    """Load a bzImage, its command line and initrd into guest RAM; returns where to enter."""
    path = Path(path)
    low = memory.regions[0].end
    room = f"RAM below the 3 GiB hole ({describe_size(low)})"
    image = read_regular(path, "kernel", low, room)
    if not is_bzimage(image):
        raise _fail(path, "not a bzImage (no HdrS setup header): give a Linux bzImage")
    # The header's own length (0x202 + the byte at 0x201) and the fields read below.
    header_end = HEADER + image[0x201]
    if len(image) < max(header_end, INIT_SIZE + 4):
        raise _fail(
            path,
            f"truncated: {len(image)} bytes end inside the setup header (it needs "
            f"{max(header_end, INIT_SIZE + 4):#x}): give a whole bzImage",
        )
    protocol = struct.unpack_from("<H", image, VERSION)[0]
    if protocol < MIN_PROTOCOL:
        raise _fail(path, f"boot protocol {protocol >> 8}.{protocol & 0xFF} is older than 2.12")
    if not struct.unpack_from("<H", image, XLOADFLAGS)[0] & XLF_KERNEL_64:
        raise _fail(path, "the kernel has no 64-bit entry point (XLF_KERNEL_64): build it 64-bit")
    setup_sects = image[SETUP_SECTS] or 4
    kernel_offset = (setup_sects + 1) * 512
    init_size = struct.unpack_from("<I", image, INIT_SIZE)[0]
    kernel = memoryview(image)[kernel_offset:]
    if not len(kernel):
        raise _fail(path, "truncated: no protected-mode kernel after the setup sectors")
    window = decompression_window(image)
    low_top = memory.regions[0].end
    kernel_end = max(window[1], KERNEL_LOAD_ADDRESS + len(kernel))
    if kernel_end > low_top:
        raise _fail(
            path,
            f"runs from {window[0]:#x} and needs {init_size:#x} bytes there (init_size), up to "
            f"{kernel_end:#x}, but RAM below the 3 GiB hole ends at {low_top:#x}: it needs at "
            f"least {kernel_end // MIB + 1} MiB of RAM to decompress: raise --memory",
        )
    # The command line is bytes, as typed (a str's non-UTF-8 bytes are surrogate escapes).
    encoded = os.fsencode(cmdline) + b"\0"
    if b"\0" in encoded[:-1]:
        raise GuestImageError("the --append text has a NUL character: remove it")
    limit = min(struct.unpack_from("<I", image, CMDLINE_SIZE)[0] + 1, COMMAND_LINE_MAX)
    if len(encoded) > limit:
        raise GuestImageError(
            f"the command line is {len(encoded) - 1} bytes: {path} takes at most {limit - 1}"
        )

    memory.write(KERNEL_LOAD_ADDRESS, kernel)
    memory.write(COMMAND_LINE, encoded)
    zero_page = memory.view(ZERO_PAGE, PAGE_SIZE)
    zero_page[:] = 0
    # header_end is "0x0202 + byte value at offset 0x0201" (checked above).
    zero_page[SETUP_HEADER:header_end] = np.frombuffer(image[SETUP_HEADER:header_end], np.uint8)

    def put(offset: int, fmt: str, value: int) -> None:
        zero_page[offset : offset + struct.calcsize(fmt)] = np.frombuffer(
            struct.pack(fmt, value), np.uint8
        )

    put(TYPE_OF_LOADER, "<B", TYPE_OF_LOADER_UNDEFINED)
    put(LOADFLAGS, "<B", image[LOADFLAGS] | LOADED_HIGH | CAN_USE_HEAP)
    put(HEAP_END_PTR, "<H", 0xFE00)  # the usual heap end for a setup that never runs
    put(CMD_LINE_PTR, "<I", COMMAND_LINE)
    placed = None
    if initrd is not None:
        placed = _load_initrd(memory, Path(initrd), image, kernel_end)
        put(RAMDISK_IMAGE, "<I", placed[0])
        put(RAMDISK_SIZE, "<I", placed[1])
    table = memory_map(memory)[:E820_MAX]
    put(E820_ENTRIES, "<B", len(table))
    for index, entry in enumerate(table):
        put(E820_TABLE + 20 * index, "<Q", entry.base)
        put(E820_TABLE + 20 * index + 8, "<Q", entry.length)
        put(E820_TABLE + 20 * index + 16, "<I", entry.type)
    memory.view(LINUX_GDT, 8 * len(LINUX_GDT_ENTRIES), np.uint64)[:] = LINUX_GDT_ENTRIES
    entry = KERNEL_LOAD_ADDRESS + 0x200
    return LinuxImage(path, entry, ZERO_PAGE, KERNEL_LOAD_ADDRESS, len(kernel), protocol, placed)


def decompression_window(image: bytes) -> tuple[int, int]:
    """[start, end) of the RAM a bzImage loaded at KERNEL_LOAD_ADDRESS runs and decompresses in.

    boot.rst: a relocatable kernel runs at its load address raised to pref_address and
    aligned up to kernel_alignment (what compressed/head_64.S computes); a non-relocatable
    one at pref_address, its fixed LOAD_PHYSICAL_ADDR. It needs init_size bytes from there.
    """
    pref_address = struct.unpack_from("<Q", image, PREF_ADDRESS)[0] or KERNEL_LOAD_ADDRESS
    init_size = struct.unpack_from("<I", image, INIT_SIZE)[0]
    if image[RELOCATABLE_KERNEL]:
        alignment = struct.unpack_from("<I", image, KERNEL_ALIGNMENT)[0] or 1
        start = -(-max(KERNEL_LOAD_ADDRESS, pref_address) // alignment) * alignment
    else:
        start = pref_address
    return start, start + init_size


def _load_initrd(memory: GuestMemory, path: Path, image: bytes, kernel_end: int) -> tuple[int, int]:
    low = memory.regions[0].end
    data = read_regular(path, "initrd", low, f"RAM below the 3 GiB hole ({describe_size(low)})")
    addr_max = struct.unpack_from("<I", image, INITRD_ADDR_MAX)[0] or 0x37FFFFFF
    top = min(addr_max + 1, memory.regions[0].end)
    address = (top - len(data)) & ~(PAGE_SIZE - 1)
    if address < kernel_end:
        raise GuestImageError(
            f"the initrd {path} ({describe_size(len(data))}) does not fit between the end of the "
            f"kernel's decompression window {kernel_end:#x} and {top:#x} (initrd_addr_max "
            f"{addr_max:#x} or the end of RAM below the 3 GiB hole): raise --memory"
        )
    memory.write(address, data)
    return address, len(data)


def enter_linux(vcpu: Vcpu) -> None:
    """Give a vCPU set up for pyvmm's long-mode entry the selectors Linux asks for.

    pyvmm's GDT has its 64-bit code at 0x08 and data at 0x10; the 64-bit boot protocol wants
    __BOOT_CS = 0x10 and __BOOT_DS = 0x18, so the vCPU gets the GDT load_linux() wrote, with
    the same flat segments under those selectors. (RIP and RSI come from the boot plan.)
    """
    sregs = vcpu.get_sregs()
    sregs.gdt.base = LINUX_GDT
    sregs.gdt.limit = 8 * len(LINUX_GDT_ENTRIES) - 1
    sregs.cs.selector = BOOT_CS
    for segment in (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
        segment.selector = BOOT_DS
    vcpu.set_sregs(sregs)
