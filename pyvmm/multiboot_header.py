"""The multiboot (version 1) header: finding it in an image and checking what it asks.

Multiboot Specification 0.6.96, section 3.1: the magic 0x1BADB002, 4-byte aligned in the
first 8192 bytes, flags, a checksum, and with flag bit 16 (the "a.out kludge") the address
fields that say where the file's bytes go. multiboot.py loads what these describe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import GuestImageError

HEADER_MAGIC = 0x1BADB002
#: The header lies completely within this many bytes from the start of the file.
HEADER_SEARCH = 8192

# Header flags. Bits 0-15 are requirements a loader must meet or refuse; 16-31 are optional.
FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_ADDRESS_FIELDS = 1 << 16  #: the "a.out kludge": load by the header, not by ELF
REQUIRED_FLAGS = 0xFFFF
HONOURED_FLAGS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

#: Header length: magic, flags and checksum; the address fields; the video fields.
HEADER_SIZE, ADDRESS_HEADER_SIZE, VIDEO_HEADER_SIZE = 12, 32, 48
_HEADER = struct.Struct("<12I")


@dataclass(frozen=True)
class MultibootHeader:
    """A multiboot header found in an image: where, its flags and its address fields."""

    offset: int  #: file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def address_fields(self) -> bool:
        """Whether flag bit 16 says to load by the address fields (the a.out kludge)."""
        return bool(self.flags & FLAG_ADDRESS_FIELDS)


def find_header(path: Path, head: bytes, file_size: int) -> MultibootHeader | None:
    """The multiboot header in head (the file's first bytes), or None if there is no magic.

    A magic whose checksum fails is skipped, as QEMU and GRUB do, but if no valid header
    follows it is reported (GuestImageError): a kernel with a broken header should hear why
    it is not booted as multiboot. So is a header cut short by the end of the file.
    """
    limit = min(len(head), HEADER_SEARCH, file_size)
    bad_checksum = None
    for offset in range(0, limit - 3, 4):
        if struct.unpack_from("<I", head, offset)[0] != HEADER_MAGIC:
            continue
        if offset + HEADER_SIZE > limit:
            if limit < file_size:
                break  # cut by the 8192-byte limit, not the file: not a header (as GRUB)
            raise GuestImageError(
                f"{path}: truncated multiboot header: the magic at offset {offset:#x} is not "
                f"followed by flags and checksum (the file ends at {file_size:#x}): rebuild it"
            )
        flags, checksum = struct.unpack_from("<II", head, offset + 4)
        if (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF:
            bad_checksum = bad_checksum or (offset, flags, checksum)
            continue
        size = HEADER_SIZE
        if flags & FLAG_ADDRESS_FIELDS:
            size = ADDRESS_HEADER_SIZE
        if flags & FLAG_VIDEO_MODE:
            size = VIDEO_HEADER_SIZE
        if offset + size > limit:
            raise GuestImageError(
                f"{path}: truncated multiboot header: flags {flags:#x} make it {size} bytes "
                f"from offset {offset:#x}, past the end of the "
                f"{'file' if limit == file_size else 'first 8192 bytes'}: rebuild it"
            )
        if not flags & FLAG_ADDRESS_FIELDS:
            return MultibootHeader(offset, flags)  # what follows is not address fields
        fields = _HEADER.unpack_from(head[offset : offset + size] + bytes(48 - size))
        return MultibootHeader(offset, flags, *fields[3:8])
    if bad_checksum is not None:
        offset, flags, checksum = bad_checksum
        raise GuestImageError(
            f"{path}: bad multiboot header checksum at offset {offset:#x}: magic + flags "
            f"{flags:#x} + checksum {checksum:#x} is not 0 mod 2^32: fix the header "
            "(or boot it with --boot elf)"
        )
    return None


def check_flags(path: Path, header: MultibootHeader) -> tuple[str, ...]:
    """Refuse required flags pyvmm does not know; the warnings for those it ignores."""
    unsupported = header.flags & REQUIRED_FLAGS & ~HONOURED_FLAGS
    if unsupported:
        raise GuestImageError(
            f"{path}: the multiboot header requires features pyvmm does not know "
            f"(flag bits {unsupported:#06x}; only bits 0-2 are defined): "
            "the spec says to refuse such a kernel"
        )
    if header.flags & FLAG_VIDEO_MODE:
        return (
            f"{path} asks for a video mode (multiboot flag bit 2): pyvmm has no display, "
            "so it is ignored, as QEMU ignores it",
        )
    return ()


@dataclass(frozen=True)
class RawImage:
    """Where the a.out-kludge fields say the image goes."""

    file_offset: int
    load_size: int
    end: int  #: of the image including bss


def raw_image(path: Path, header: MultibootHeader, file_size: int) -> RawImage:
    """Check the address fields against each other and the file (Multiboot 3.1.3)."""
    h = header
    if h.load_addr > h.header_addr:
        raise GuestImageError(
            f"{path}: multiboot load_addr {h.load_addr:#x} is above header_addr "
            f"{h.header_addr:#x}: the spec requires load_addr <= header_addr"
        )
    file_offset = h.offset - (h.header_addr - h.load_addr)
    if file_offset < 0:
        raise GuestImageError(
            f"{path}: multiboot header_addr - load_addr ({h.header_addr - h.load_addr:#x}) is "
            f"more than the header's file offset ({h.offset:#x}): the address fields are "
            "inconsistent"
        )
    if h.load_end_addr == 0:
        load_size = file_size - file_offset  # text and data are the rest of the file
    elif h.load_end_addr < h.load_addr:
        raise GuestImageError(
            f"{path}: multiboot load_end_addr {h.load_end_addr:#x} is below load_addr "
            f"{h.load_addr:#x}: the address fields are inconsistent"
        )
    else:
        load_size = h.load_end_addr - h.load_addr
        if file_offset + load_size > file_size:
            raise GuestImageError(
                f"{path} is truncated: multiboot load_end_addr {h.load_end_addr:#x} needs "
                f"{load_size:#x} bytes from file offset {file_offset:#x}, the file has "
                f"{file_size:#x}: rebuild or re-copy it"
            )
    end = h.load_addr + load_size
    if h.bss_end_addr:
        if h.bss_end_addr < end:
            raise GuestImageError(
                f"{path}: multiboot bss_end_addr {h.bss_end_addr:#x} is below the end of the "
                f"loaded image {end:#x}: the address fields are inconsistent"
            )
        end = h.bss_end_addr
    if not h.load_addr <= h.entry_addr < h.load_addr + load_size:
        raise GuestImageError(
            f"{path}: multiboot entry_addr {h.entry_addr:#x} is outside the loaded image "
            f"[{h.load_addr:#x}, {h.load_addr + load_size:#x})"
        )
    return RawImage(file_offset, load_size, end)
