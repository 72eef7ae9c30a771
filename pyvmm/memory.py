"""Guest RAM: anonymous mmap-backed numpy arrays, laid out like a PC's.

RAM below 3 GiB sits at guest-physical 0; anything beyond continues at 4 GiB, leaving the
usual hole below 4 GiB for MMIO. The mappings are MAP_NORESERVE, so a 4 GiB guest costs only
the pages it touches. Every access goes through a bounds-checked translation to a numpy view
of host memory: no copies, and a stray guest-physical address is an error, not a crash.
"""

from __future__ import annotations

import mmap
import re
import resource
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from pyvmm.errors import ConfigurationError

MIB = 1 << 20
GIB = 1 << 30
#: Start of the PCI/MMIO hole below 4 GiB.
MMIO_HOLE_START = 3 * GIB
#: Where RAM resumes above the hole.
HIGH_RAM_START = 4 * GIB
#: The PCI ECAM window in the hole (docs/guest-abi.md): 256 buses of 1 MiB.
ECAM_BASE, ECAM_SIZE = 0xE000_0000, 256 << 20
#: Linux's MAP_NORESERVE (the mmap module does not export it).
MAP_NORESERVE = 0x4000
PAGE_SIZE = 4096

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a memory size such as 64M, 4G, 512MiB or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ConfigurationError(f"bad memory size {text!r}: use a number with K, M or G, e.g. 64M")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, _, value = line.partition(":")
                if name == field:
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_memory_limit() -> tuple[int, str] | None:
    """The most guest RAM this host can ever back, and what sets that limit, if known.

    MAP_NORESERVE lets a mapping far beyond RAM succeed, and KVM's memory slot set-up then
    takes seconds before the first touch fails; a guest larger than RAM plus swap (or the
    commit limit under strict overcommit, or RLIMIT_AS) can never run, so it is refused now.
    """
    limits = []
    total, swap = _meminfo_bytes("MemTotal"), _meminfo_bytes("SwapTotal")
    if total is not None:
        limits.append((total + (swap or 0), "the host's RAM plus swap (MemTotal + SwapTotal)"))
    try:
        with open("/proc/sys/vm/overcommit_memory") as mode:
            strict = mode.read().strip() == "2"
    except OSError:
        strict = False
    commit = _meminfo_bytes("CommitLimit") if strict else None
    if commit is not None:
        limits.append((commit, "the host's CommitLimit (vm.overcommit_memory = 2)"))
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY:
        limits.append((address_space, "RLIMIT_AS (ulimit -v)"))
    return min(limits) if limits else None


def describe_size(size: int) -> str:
    """A byte count as the largest unit that shows it to a tenth: 64 MiB, 23.5 GiB."""
    for unit, name in ((1 << 40, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            return f"{size / unit:.1f}".removesuffix(".0") + f" {name}"
    return f"{size} bytes"


@dataclass
class MemoryRegion:
    """One contiguous stretch of guest RAM and the host mapping behind it."""

    guest_phys_addr: int
    size: int
    array: np.ndarray
    mapping: mmap.mmap

    @property
    def end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the region's first byte (for memory slots)."""
        return self.array.ctypes.data


class GuestMemory:
    """Guest RAM of a given size, split around the MMIO hole, with guest-physical views."""

    def __init__(self, size: int | str) -> None:
        size = parse_size(size)
        if size < MIB or size % PAGE_SIZE:
            raise ConfigurationError(
                f"guest memory must be at least 1 MiB and a multiple of 4 KiB, not {size} bytes"
            )
        limit = host_memory_limit()
        if limit is not None and size > limit[0]:
            raise ConfigurationError(
                f"--memory {describe_size(size)} is more than this host can back: at most "
                f"{describe_size(limit[0])} ({limit[1]}): lower --memory"
            )
        self.size = size
        self.regions: list[MemoryRegion] = []
        low = min(size, MMIO_HOLE_START)
        try:
            self._add_region(0, low)
            if size > low:
                self._add_region(HIGH_RAM_START, size - low)
        except OSError as error:
            self.close()
            raise ConfigurationError(
                f"cannot map {describe_size(size)} of guest RAM: {error.strerror}: lower --memory"
            ) from None

    def _add_region(self, guest_phys_addr: int, size: int) -> None:
        mapping = mmap.mmap(
            -1,
            size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        array = np.frombuffer(mapping, dtype=np.uint8)
        self.regions.append(MemoryRegion(guest_phys_addr, size, array, mapping))

    @property
    def top(self) -> int:
        """One past the highest guest-physical RAM address."""
        return self.regions[-1].end

    def region_of(self, guest_phys_addr: int, length: int = 1) -> MemoryRegion | None:
        """Return the region holding [addr, addr + length), or None if no single one does."""
        for region in self.regions:
            if region.guest_phys_addr <= guest_phys_addr and guest_phys_addr + length <= region.end:
                return region
        return None

    def contains(self, guest_phys_addr: int, length: int = 1) -> bool:
        """Whether [addr, addr + length) is RAM, within a single region."""
        return length >= 0 and self.region_of(guest_phys_addr, length) is not None

    def view(
        self, guest_phys_addr: int, length: int, dtype: np.dtype | type = np.uint8
    ) -> np.ndarray:
        """A writable zero-copy view of guest RAM as an array of dtype."""
        itemsize = np.dtype(dtype).itemsize
        region = self.region_of(guest_phys_addr, length)
        if region is None or length < 0:
            raise IndexError(
                f"guest-physical range [{guest_phys_addr:#x}, {guest_phys_addr + length:#x}) "
                "is not RAM"
            )
        if length % itemsize or guest_phys_addr % itemsize:
            raise ValueError(f"{length} bytes at {guest_phys_addr:#x} is not {dtype} aligned")
        start = guest_phys_addr - region.guest_phys_addr
        return region.array[start : start + length].view(dtype)

    def read(self, guest_phys_addr: int, length: int) -> bytes:
        """Copy bytes out of guest RAM."""
        return self.view(guest_phys_addr, length).tobytes()

    def write(self, guest_phys_addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy bytes into guest RAM."""
        self.view(guest_phys_addr, len(data))[:] = np.frombuffer(data, dtype=np.uint8)

    def fill(self, guest_phys_addr: int, length: int, value: int = 0) -> None:
        """Set a range of guest RAM to one byte value (e.g. zero a BSS)."""
        self.view(guest_phys_addr, length)[:] = value

    def load_from_file(
        self, file: BinaryIO, file_offset: int, guest_phys_addr: int, length: int
    ) -> None:
        """Read length bytes of file straight into guest RAM (no intermediate bytes object)."""
        target = memoryview(self.view(guest_phys_addr, length))
        file.seek(file_offset)
        done = 0
        while done < length:
            count = file.readinto(target[done:])
            if not count:
                raise EOFError(
                    f"file ends {length - done} bytes short of {length} at {file_offset:#x}"
                )
            done += count

    def close(self) -> None:
        """Unmap guest RAM; views handed out earlier keep their pages until they are dropped."""
        for region in self.regions:
            region.array = np.empty(0, dtype=np.uint8)
            try:
                region.mapping.close()
            except BufferError:
                pass  # a caller still holds a view: the mapping goes when that view does
        self.regions = []


class MemorySlots:
    """KVM memory slot numbers: RAM takes the first, assigned devices' BARs the rest."""

    def __init__(self, first_free: int) -> None:
        self._next = first_free
        self._free: list[int] = []

    def allocate(self) -> int:
        """A slot number nothing uses."""
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def release(self, slot: int) -> None:
        """Give back a slot whose region was deleted."""
        self._free.append(slot)
