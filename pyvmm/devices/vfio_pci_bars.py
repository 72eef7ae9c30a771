"""An assigned device's BARs in the guest's address spaces: mapped, trapped, or refused.

A memory BAR whose VFIO region may be mmap'd becomes KVM memory slots, so guest accesses
cause no exits at all; the pages holding the MSI-X table, and BARs that cannot be mmap'd
(I/O BARs, mmap turned off), are trapped and forwarded to the device by the C run loop
(pread/pwrite on the device fd), never entering Python. A trapped access the device refuses
(vfio-pci refuses memory BARs while memory decode is off in its view of the command register)
is the guest's problem, as in QEMU: the read gives all ones, the write is dropped, and the
BAR's ``faults`` count it for a warning at the end of the run.

The guest may move a BAR anywhere. Where the place is taken (guest RAM, another device's
range, a platform device such as the IOAPIC or the local APIC, the firmware ROM) or cannot
exist (beyond the guest's physical address width), or where KVM or mmap refuse it, the BAR
is refused there: nothing is decoded at that place, accesses reach whatever owned it, and
``BarRefusedError`` says why. Moving the BAR to a free place maps it again. Even the mmap'd parts
of a BAR claim their range on the MMIO bus, so that the bus's overlap check sees every BAR.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvmm._native import ffi, lib
from pyvmm.acpi import IOAPIC_ADDRESS, LOCAL_APIC_ADDRESS
from pyvmm.bus import Bus, ForwardFaults, NativeHandler, PythonHandler
from pyvmm.errors import PyvmmError
from pyvmm.firmware import ROM_BASE, ROM_SIZE
from pyvmm.kvm import Vm
from pyvmm.memory import PAGE_SIZE, MemorySlots
from pyvmm.pci import config as pci
from pyvmm.pci.msi import MsixCapability
from pyvmm.vfio import RegionInfo

#: Guest-physical ranges of the platform's own devices: no BAR may be decoded over them.
PLATFORM_RANGES = (
    (IOAPIC_ADDRESS, 0x1000, "the IOAPIC"),
    # The whole MSI window, not only the LAPIC's page: device writes there are interrupts.
    (LOCAL_APIC_ADDRESS, 0x10_0000, "the local APIC and MSI window"),
    (ROM_BASE, ROM_SIZE, "the firmware ROM"),
)
#: Where /proc/cpuinfo does not say: x86-64's architectural maximum.
DEFAULT_PHYSICAL_BITS = 52


class BarRefusedError(PyvmmError):
    """A BAR cannot be decoded where the guest put it; the message says why."""


@dataclass
class Bar:
    """One BAR (or the ROM BAR): its region, its place in the guest, how it is mapped now."""

    index: int
    region: RegionInfo
    flags: int  #: the low bits the guest reads back: I/O, or memory type and prefetchable
    address: int
    is_64: bool = False
    mapped_at: int | None = None
    #: The place last refused: the guest writing it again gets no second attempt or warning.
    refused_at: int | None = None
    slots: list[tuple[int, int, Any, Any]] = field(default_factory=list)
    ranges: list[tuple[Bus, int]] = field(default_factory=list)
    #: Trapped accesses the device refused, wherever the BAR was: one record for all its pieces.
    faults: ForwardFaults = field(default_factory=ForwardFaults)

    @property
    def size(self) -> int:
        """Bytes (or ports) the BAR decodes."""
        return self.region.size

    @property
    def is_io(self) -> bool:
        """An I/O-space BAR."""
        return self.index < 6 and bool(self.flags & pci.BAR_IO)

    @property
    def name(self) -> str:
        """BAR0..BAR5 or ROM, for messages and bus range names."""
        return "ROM" if self.index == 6 else f"BAR{self.index}"


def physical_address_bits(cpuinfo: str = "/proc/cpuinfo") -> int:
    """The CPU's physical address width, which KVM's memory slots and the guest's CPUID share."""
    try:
        with open(cpuinfo) as file:
            for line in file:
                if line.startswith("address sizes"):
                    return int(line.split(":")[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_PHYSICAL_BITS


def placement_problem(
    address: int,
    size: int,
    reserved: Sequence[tuple[int, int, str]],
    physical_bits: int,
) -> str | None:
    """Why a memory BAR cannot be decoded at [address, address + size), or None if it can.

    reserved: (base, length, what) ranges no BAR may cover: guest RAM and platform devices.
    Other devices' ranges are the MMIO bus's to check.
    """
    end = address + size
    if end > 1 << physical_bits:
        return (
            f"[{address:#x}, {end:#x}) is beyond the guest's {physical_bits}-bit "
            "physical address space"
        )
    for base, length, what in reserved:
        if address < base + length and base < end:
            return f"[{address:#x}, {end:#x}) overlaps {what} [{base:#x}, {base + length:#x})"
    return None


def segments(bar: Bar, msix: MsixCapability | None, mmap_bars: bool) -> list[tuple[str, int, int]]:
    """Split a memory BAR into runs of pages: mmap'd, MSI-X table window, or trapped.

    The table's pages are the table window; the PBA's pages are trapped (forwarded to
    the device) even where VFIO would let them be mapped, so that every MSI-X access
    is seen by the VMM, as QEMU does it.
    """
    table = pba = None
    if msix is not None and msix.table_bar == bar.index:
        table = (msix.table_offset, msix.table_offset + msix.table_size)
    if msix is not None and msix.pba_bar == bar.index:
        pba = (msix.pba_offset, msix.pba_offset + (msix.entries + 63) // 64 * 8)
    areas = bar.region.mmap_areas if mmap_bars and bar.region.can_mmap else ()
    kinds = []
    for start in range(0, bar.size, PAGE_SIZE):
        end = min(start + PAGE_SIZE, bar.size)
        if table and start < table[1] and table[0] < end:
            kinds.append("msix")
        elif pba and start < pba[1] and pba[0] < end:
            kinds.append("trap")
        elif end - start == PAGE_SIZE and any(a <= start and end <= a + s for a, s in areas):
            kinds.append("mmap")
        else:
            kinds.append("trap")
    runs: list[tuple[str, int, int]] = []
    for page, kind in enumerate(kinds):
        start = page * PAGE_SIZE
        length = min(PAGE_SIZE, bar.size - start)
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1], runs[-1][2] + length)
        else:
            runs.append((kind, start, length))
    return runs


class BarMapper:
    """Maps one device's BARs where the guest put them, and unmaps them, on buses and slots."""

    def __init__(
        self,
        *,
        device_name: str,
        fd: int,
        vm: Vm,
        pio: Bus,
        mmio: Bus,
        slots: MemorySlots,
        mmap_bars: bool,
        guest_ram: Sequence[tuple[int, int]],
    ) -> None:
        self.device_name, self.fd, self.vm, self.pio, self.mmio = device_name, fd, vm, pio, mmio
        self.memory_slots, self.mmap_bars = slots, mmap_bars
        self.reserved = [(base, length, "guest RAM") for base, length in guest_ram]
        self.reserved += PLATFORM_RANGES
        self.physical_bits = physical_address_bits()
        #: (BAR, its offset) of the MSI-X table's window while it is mapped.
        self.msix_window: tuple[Bar, int] | None = None
        #: Memory slots KVM refused to delete, and their mappings: (slot, base, mmap, buffer).
        self.stranded: list[tuple[int, int, mmap.mmap, Any]] = []

    def map(self, bar: Bar, msix: MsixCapability | None, table_written: PythonHandler) -> None:
        """Decode bar at bar.address, or raise BarRefusedError with nothing left mapped."""
        if not bar.is_io:
            problem = placement_problem(bar.address, bar.size, self.reserved, self.physical_bits)
            if problem is not None:
                raise BarRefusedError(problem)
        bar.mapped_at = bar.address
        try:
            self._map(bar, msix, table_written)
        except (PyvmmError, OSError, ValueError) as error:
            self.unmap(bar)
            message = error.message if isinstance(error, PyvmmError) else str(error)
            raise BarRefusedError(message) from error

    def _map(self, bar: Bar, msix: MsixCapability | None, table_written: PythonHandler) -> None:
        name = f"{self.device_name} {bar.name}"
        fd, region = self.fd, bar.region
        if bar.is_io:
            self.pio.add_fd(bar.address, bar.size, fd, region.offset, name, bar.faults)
            bar.ranges.append((self.pio, bar.address))
            return
        for kind, start, length in segments(bar, msix, self.mmap_bars):
            base = bar.address + start
            if kind == "msix":
                self._map_msix_window(bar, base, start, length, msix, table_written)
                continue
            # Claimed on the bus even where mapped: the overlap check then sees every BAR.
            self.mmio.add_fd(base, length, fd, region.offset + start, name, bar.faults)
            bar.ranges.append((self.mmio, base))
            if kind == "mmap":
                mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, offset=region.offset + start)
                buffer = ffi.from_buffer(mapping)
                slot = self.memory_slots.allocate()
                try:
                    host = int(ffi.cast("uintptr_t", buffer))
                    self.vm.set_user_memory_region(slot, base, length, host)
                except BaseException:
                    self.memory_slots.release(slot)
                    ffi.release(buffer)
                    mapping.close()
                    raise
                bar.slots.append((slot, base, mapping, buffer))

    def _map_msix_window(
        self,
        bar: Bar,
        base: int,
        start: int,
        length: int,
        msix: MsixCapability,
        table_written: PythonHandler,
    ) -> None:
        window = ffi.new(
            "struct pyvmm_msix_window *",
            {
                "table_offset": msix.table_offset - start,
                "table_size": msix.table_size,
                "table": ffi.from_buffer(msix.table),
            },
        )
        handler = NativeHandler(
            lib.PYVMM_HANDLER_MSIX,
            fd=self.fd,
            fd_offset=bar.region.offset + start,
            device=window,
            keep=(window, msix.table),
            python=table_written,
            faults=bar.faults,  # the PBA and what else shares the table's pages
        )
        self.mmio.add(base, length, handler, f"{self.device_name} MSI-X table")
        bar.ranges.append((self.mmio, base))
        self.msix_window = (bar, start)

    def unmap(self, bar: Bar) -> None:
        """Delete the BAR's memory slots and bus ranges: nothing decodes it afterwards.

        Every step runs even where KVM refuses one (the first refusal is raised at the end).
        A slot KVM would not delete keeps its mapping, so that guest memory never points at
        pages the host may reuse: it waits in ``stranded`` for close().
        """
        failure: PyvmmError | None = None
        for entry in bar.slots:
            slot, base, mapping, buffer = entry
            try:
                self.vm.set_user_memory_region(slot, base, 0, 0)
            except PyvmmError as error:
                failure = failure or error
                self.stranded.append(entry)
                continue
            self.memory_slots.release(slot)
            ffi.release(buffer)
            mapping.close()
        for bus, base in bar.ranges:
            bus.remove(base)
        if self.msix_window is not None and self.msix_window[0] is bar:
            self.msix_window = None
        bar.slots, bar.ranges, bar.mapped_at = [], [], None
        if failure is not None:
            raise failure

    def close(self) -> None:
        """At teardown, after unmap(): end the stranded slots' mappings, whatever KVM says.

        Each mapping holds the device file open (the group or iommufd would stay busy); no
        vCPU runs any more, so the guest can no longer reach the pages once they go.
        """
        stranded, self.stranded = self.stranded, []
        for slot, base, mapping, buffer in stranded:
            with contextlib.suppress(PyvmmError):
                self.vm.set_user_memory_region(slot, base, 0, 0)
            ffi.release(buffer)
            mapping.close()
