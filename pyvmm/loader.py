"""ELF guest loading with pyelftools: PT_LOAD segments into guest RAM, BSS zeroed, entry point.

Every check that can fail on a bad image runs before a byte is written, and each failure is a
GuestImageError whose one line names the file, the problem and the fix.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyvmm.errors import GuestImageError
from pyvmm.imagefile import open_regular
from pyvmm.memory import MIB, GuestMemory

#: Lowest address of a segment in long or protected mode: below lie the VMM's boot tables.
PROTECTED_LOAD_MIN = MIB
#: Conventional memory a real-mode image may use.
REAL_MODE_LOAD_RANGE = (0x500, 0xA0000)

_MACHINES = {"EM_X86_64": 64, "EM_386": 32}


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD segment as placed in guest RAM."""

    guest_phys_addr: int
    file_size: int
    memory_size: int


@dataclass(frozen=True)
class LoadedImage:
    """What the loader put in guest RAM and where execution starts."""

    path: Path
    entry: int
    elf_class: int  #: 32 or 64
    segments: tuple[Segment, ...]


#: pyelftools seeks and unpacks where the headers say: a wild field fails in any of these.
_PARSE_ERRORS = (ELFError, OSError, ValueError, OverflowError, struct.error)


def _malformed(path: Path, error: Exception) -> GuestImageError:
    detail = " ".join(str(error).split())
    return GuestImageError(f"{path} is a malformed ELF file ({detail}): rebuild it")


def _open_elf(path: Path, file) -> ELFFile:
    try:
        elf = ELFFile(file)
    except _PARSE_ERRORS as error:
        file.seek(0)
        if file.read(4) != b"\x7fELF":
            raise GuestImageError(
                f"{path} is not an ELF file (no ELF magic): build the guest as an ELF executable"
            ) from None
        raise _malformed(path, error) from None
    machine = elf["e_machine"]
    if machine not in _MACHINES or _MACHINES[machine] != elf.elfclass:
        raise GuestImageError(
            f"{path} is an ELF{elf.elfclass} for {machine}, not x86: build it for x86-64 or i386"
        )
    if elf["e_type"] != "ET_EXEC":
        raise GuestImageError(
            f"{path} is {elf['e_type']}, not an executable: "
            "link it static and non-PIE (-static -no-pie)"
        )
    return elf


def _segments(path: Path, elf: ELFFile, file_size: int) -> list[tuple[Segment, int]]:
    """Collect PT_LOAD segments with their file offsets, checking each against the file."""
    found = []
    table_end = elf["e_phoff"] + elf["e_phnum"] * elf["e_phentsize"]
    if elf["e_phnum"] and table_end > file_size:
        raise GuestImageError(
            f"{path} is truncated or malformed: its program headers run to {table_end:#x} but "
            f"the file has {file_size:#x}: rebuild or re-copy it"
        )
    try:
        for header in elf.iter_segments():
            if header["p_type"] != "PT_LOAD" or header["p_memsz"] == 0:
                continue
            segment = Segment(header["p_paddr"], header["p_filesz"], header["p_memsz"])
            offset = header["p_offset"]
            if segment.file_size > segment.memory_size:
                raise GuestImageError(
                    f"{path}: a segment at {segment.guest_phys_addr:#x} has more file bytes than "
                    "memory bytes: the image is malformed, rebuild it"
                )
            if offset + segment.file_size > file_size:
                raise GuestImageError(
                    f"{path} is truncated: a segment needs bytes up to "
                    f"{offset + segment.file_size:#x} "
                    f"but the file has {file_size:#x}: rebuild or re-copy it"
                )
            found.append((segment, offset))
    except _PARSE_ERRORS as error:
        raise _malformed(path, error) from None
    if not found:
        raise GuestImageError(f"{path} has no loadable segment: link it with a PT_LOAD segment")
    return found


def _check_placement(
    path: Path,
    memory: GuestMemory,
    segments: list[Segment],
    real_mode: bool,
    conventional: tuple[int, int] | None,
) -> None:
    low, high = REAL_MODE_LOAD_RANGE if real_mode else (PROTECTED_LOAD_MIN, memory.top)
    for segment in segments:
        start, end = segment.guest_phys_addr, segment.guest_phys_addr + segment.memory_size
        if conventional is not None and conventional[0] <= start and end <= conventional[1]:
            continue
        if start < low or end > high or not memory.contains(start, segment.memory_size):
            where = (
                "conventional memory [0x500, 0xa0000)"
                if real_mode
                else "guest RAM above 1 MiB ("
                + " and ".join(
                    f"[{max(r.guest_phys_addr, low):#x}, {r.end:#x})" for r in memory.regions
                )
                + ")"
            )
            if conventional is not None:
                start_low, end_low = conventional
                where = f"conventional memory [{start_low:#x}, {end_low:#x}) and {where}"
            raise GuestImageError(
                f"{path}: segment [{start:#x}, {end:#x}) lies outside {where}: "
                "relink the guest or give it more --memory"
            )
    ordered = sorted(segments, key=lambda s: s.guest_phys_addr)
    for before, after in itertools.pairwise(ordered):
        if before.guest_phys_addr + before.memory_size > after.guest_phys_addr:
            raise GuestImageError(
                f"{path}: segments at {before.guest_phys_addr:#x} and {after.guest_phys_addr:#x} "
                "overlap: fix the guest's linker script"
            )


def _plan(
    path: Path, memory: GuestMemory, real_mode: bool, conventional: tuple[int, int] | None
) -> tuple[LoadedImage, list[tuple[Segment, int]]]:
    """Open and check an ELF image: where it goes, and each segment's file offset."""
    with open_regular(path, "guest image") as file:
        file_size = os.fstat(file.fileno()).st_size
        elf = _open_elf(path, file)
        placed = _segments(path, elf, file_size)
        segments = [segment for segment, _ in placed]
        _check_placement(path, memory, segments, real_mode, conventional)
        entry = elf["e_entry"]
        if not any(
            s.guest_phys_addr <= entry < s.guest_phys_addr + s.memory_size for s in segments
        ):
            raise GuestImageError(f"{path}: entry point {entry:#x} is outside every loaded segment")
        return LoadedImage(path, entry, elf.elfclass, tuple(segments)), placed


def inspect_elf(
    memory: GuestMemory,
    path: str | Path,
    *,
    real_mode: bool = False,
    conventional: tuple[int, int] | None = None,
) -> LoadedImage:
    """Make every check load_elf makes and say where the image would go, writing nothing.

    For boot protocols that place more data after the image (multiboot modules): they can
    check that it all fits before guest RAM is touched.
    """
    return _plan(Path(path), memory, real_mode, conventional)[0]


def load_elf(
    memory: GuestMemory,
    path: str | Path,
    *,
    real_mode: bool = False,
    conventional: tuple[int, int] | None = None,
) -> LoadedImage:
    """Load an ELF32 or ELF64 x86 executable into guest RAM and return where it landed.

    conventional: a range below 1 MiB [start, end) where a segment may lie too, in
    protected mode (multiboot kernels: the boot protocol keeps its structures clear).
    """
    path = Path(path)
    image, placed = _plan(path, memory, real_mode, conventional)
    with open_regular(path, "guest image") as file:
        for segment, offset in placed:
            memory.load_from_file(file, offset, segment.guest_phys_addr, segment.file_size)
            memory.fill(
                segment.guest_phys_addr + segment.file_size,
                segment.memory_size - segment.file_size,
            )
    return image
