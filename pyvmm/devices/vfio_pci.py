"""An assigned PCI device or mdev: a real device behind VFIO, on the guest's PCI bus.

The guest sees the device's own configuration space, except where the VMM must own it:

- BARs and the expansion ROM BAR: pyvmm placed them (pci/resources.py) and emulates sizing
  and moves. A memory BAR whose VFIO region may be mmap'd becomes KVM memory slots, so guest
  accesses cause no exits at all; the pages holding the MSI-X table, and BARs that cannot be
  mmap'd (I/O BARs, mmap turned off), are trapped and forwarded to the device by the C run
  loop (pread/pwrite on the device fd), never entering Python.
- MSI and MSI-X: emulated (pci/msi.py); each vector is an eventfd that VFIO signals and a KVM
  irqfd on a GSI whose MSI route follows the guest's address, data and mask bits.
- INTx: an eventfd VFIO signals, a KVM irqfd with a resample eventfd on the GSI pyvmm wired
  the pin to (pci/config.py), and VFIO unmask on each resample, so the level-triggered line
  re-arms after every EOI.
- The capability list shows only what pyvmm supports (MSI, MSI-X, power management, PCI
  Express); the extended space reads as empty. Every other access goes to the device.

One device, one file, as in kvmtool: it is longer than pyvmm's other modules because it is
the whole device, read top to bottom: set-up, configuration space, BARs, interrupts, teardown.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
from dataclasses import dataclass, field
from typing import Any

from pyvmm._native import ffi, lib
from pyvmm.bus import Bus, NativeHandler
from pyvmm.errors import ConfigurationError, PyvmmError
from pyvmm.irq import EVENTFD_TRIGGER, NONE_TRIGGER, GsiRouting, IntxLine, MsiVector
from pyvmm.kvm import Vm
from pyvmm.memory import PAGE_SIZE, MemorySlots
from pyvmm.pci import config as pci
from pyvmm.pci.msi import MSIX_ENTRY_SIZE, MsiCapability, MsixCapability
from pyvmm.pci.resources import PciResources
from pyvmm.vfio import RegionInfo, VfioDevice

CONFIG = lib.VFIO_PCI_CONFIG_REGION_INDEX
INTX, MSI, MSIX = (
    lib.VFIO_PCI_INTX_IRQ_INDEX,
    lib.VFIO_PCI_MSI_IRQ_INDEX,
    lib.VFIO_PCI_MSIX_IRQ_INDEX,
)
EXPOSED_CAPABILITIES = {pci.CAP_POWER_MANAGEMENT, pci.CAP_MSI, pci.CAP_EXPRESS, pci.CAP_MSIX}


@dataclass
class Bar:
    """One BAR (or the ROM BAR): its region, its place in the guest, how it is mapped now."""

    index: int
    region: RegionInfo
    flags: int  #: the low bits the guest reads back: I/O, or memory type and prefetchable
    address: int
    is_64: bool = False
    mapped_at: int | None = None
    slots: list[tuple[int, int, Any, Any]] = field(default_factory=list)
    ranges: list[tuple[Bus, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes (or ports) the BAR decodes."""
        return self.region.size

    @property
    def is_io(self) -> bool:
        """An I/O-space BAR."""
        return self.index < 6 and bool(self.flags & pci.BAR_IO)


class VfioPciDevice:
    """A VFIO device on the guest's PCI bus at a slot: config space, BARs and interrupts."""

    def __init__(
        self,
        device: VfioDevice,
        slot: int,
        *,
        vm: Vm,
        pio: Bus,
        mmio: Bus,
        routing: GsiRouting,
        slots: MemorySlots,
        resources: PciResources,
        mmap_bars: bool = True,
    ) -> None:
        self.device, self.slot, self.vm, self.pio, self.mmio = device, slot, vm, pio, mmio
        self.routing, self.memory_slots, self.mmap_bars = routing, slots, mmap_bars
        self.flags = self.command = 0
        self.vectors: list[MsiVector] = []
        self.active_irq: int | None = None
        self.intx: IntxLine | None = None
        self.bars: dict[int, Bar] = {}
        self.rom: Bar | None = None
        try:
            self._set_up(resources)
        except BaseException:
            self.close()
            raise

    def _set_up(self, resources: PciResources) -> None:
        device = self.device
        self.flags, _, _ = device.get_info()
        if not self.flags & lib.VFIO_DEVICE_FLAGS_PCI:
            raise PyvmmError(f"{device.name} is not a PCI device: pyvmm assigns PCI devices only")
        if self.flags & lib.VFIO_DEVICE_FLAGS_RESET:
            device.reset()  # whatever the last user left behind, before anything is set up
        device.get_region_info(CONFIG)
        self._place_bars(resources)
        self._find_capabilities()
        pin = self._device_read(pci.INTERRUPT_PIN, 1)
        self.interrupt_line = pci.intx_gsi(self.slot, pin) if 1 <= pin <= 4 else 0xFF
        if 1 <= pin <= 4 and device.get_irq_info(INTX).count:
            self.intx = IntxLine(device, self.vm, self.interrupt_line)
            self._enable_intx()
        # Firmware leaves decoding off: the guest turns it on.
        device.write(CONFIG, pci.COMMAND, 2, 0)

    # ---- set-up -------------------------------------------------------------------------
    def _device_read(self, offset: int, size: int) -> int:
        return self.device.read(CONFIG, offset, size)

    def _place_bars(self, resources: PciResources) -> None:
        index = 0
        while index < pci.BAR_COUNT:
            region = self.device.get_region_info(index)
            register = self._device_read(pci.BAR0 + 4 * index, 4)
            is_64 = not register & pci.BAR_IO and bool(register & pci.BAR_MEMORY_64)
            if region.size:
                flags = register & (0x3 if register & pci.BAR_IO else 0xF)
                if register & pci.BAR_IO:
                    address = resources.io(region.size)
                else:
                    address = resources.memory(region.size, is_64)
                self.bars[index] = Bar(index, region, flags, address, is_64)
            index += 2 if is_64 else 1
        rom = self.device.get_region_info(lib.VFIO_PCI_ROM_REGION_INDEX)
        self.rom = Bar(6, rom, 0, resources.memory(rom.size, False)) if rom.size else None
        self.rom_enabled = False

    def _find_capabilities(self) -> None:
        self.capabilities: list[tuple[int, int]] = []
        self.msi: MsiCapability | None = None
        self.msix: MsixCapability | None = None
        self.msix_window: tuple[Bar, int] | None = None
        if not self._device_read(pci.STATUS, 2) & pci.STATUS_CAPABILITIES:
            return
        offset, seen = self._device_read(pci.CAPABILITY_POINTER, 1) & 0xFC, set()
        while offset and offset not in seen:
            seen.add(offset)
            cap_id = self._device_read(offset, 1)
            if cap_id in EXPOSED_CAPABILITIES:
                self.capabilities.append((offset, cap_id))
            raw = b"".join(
                self._device_read(offset + i, 4).to_bytes(4, "little") for i in range(0, 24, 4)
            )
            if cap_id == pci.CAP_MSI:
                self.msi = MsiCapability(raw)
            elif cap_id == pci.CAP_MSIX:
                self.msix = MsixCapability(raw)
            offset = self._device_read(offset + 1, 1) & 0xFC

    # ---- configuration space ------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        """The guest's view: the device's registers with pyvmm's own overlaid."""
        if offset >= pci.CONFIG_SPACE_SIZE:
            return 0
        value, device_value = 0, None
        for i in range(size):
            byte = self._emulated_byte(offset + i)
            if byte is None:
                if device_value is None:
                    device_value = self._device_read(offset, size)
                byte = (device_value >> 8 * i) & 0xFF
            value |= byte << 8 * i
        return value

    def _emulated_byte(self, offset: int) -> int | None:
        if pci.BAR0 <= offset < pci.BAR0 + 4 * pci.BAR_COUNT:
            return self._bar_register((offset - pci.BAR0) // 4) >> 8 * (offset % 4) & 0xFF
        if pci.ROM_BAR <= offset < pci.ROM_BAR + 4:
            return self._rom_register() >> 8 * (offset - pci.ROM_BAR) & 0xFF
        if offset == pci.STATUS:
            status = self._device_read(pci.STATUS, 1) & ~pci.STATUS_CAPABILITIES
            return status | (pci.STATUS_CAPABILITIES if self.capabilities else 0)
        if offset == pci.CAPABILITY_POINTER:
            return self.capabilities[0][0] if self.capabilities else 0
        if offset == pci.INTERRUPT_LINE:
            return self.interrupt_line
        for position, (cap, cap_id) in enumerate(self.capabilities):
            if offset == cap + 1:
                following = self.capabilities[position + 1 : position + 2]
                return following[0][0] if following else 0
            emulated = self.msi if cap_id == pci.CAP_MSI else self.msix
            if cap_id in (pci.CAP_MSI, pci.CAP_MSIX) and cap + 2 <= offset < cap + emulated.size:
                return emulated.bytes[offset - cap]
        return None

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Apply a guest write: to pyvmm's registers where emulated, else to the device."""
        if offset >= pci.CONFIG_SPACE_SIZE:
            return
        emulated = [self._emulated_byte(offset + i) is not None for i in range(size)]
        if not any(emulated):
            self.device.write(CONFIG, offset, size, value)
        touched: set[str] = set()
        for i in range(size):
            byte = (value >> 8 * i) & 0xFF
            where = offset + i
            if emulated[i]:
                touched.add(self._write_emulated_byte(where, byte))
            elif any(emulated):
                self.device.write(CONFIG, where, 1, byte)
        if offset <= pci.COMMAND + 1 and pci.COMMAND < offset + size:
            # Decoding follows what the guest wrote (an mdev need not echo it back).
            command = self.command
            for i in range(size):
                if pci.COMMAND <= offset + i <= pci.COMMAND + 1:
                    shift = 8 * (offset + i - pci.COMMAND)
                    command = (command & ~(0xFF << shift)) | ((value >> 8 * i) & 0xFF) << shift
            self._command_written(command)
        for what in touched:
            if what.startswith("bar"):
                self._bar_moved(self.bars[int(what[3:])])
            elif what == "rom" and self.rom is not None:
                self._bar_moved(self.rom)
            elif what == "msi":
                self._msi_written()
            elif what == "msix":
                self._msix_control_written()

    def _write_emulated_byte(self, offset: int, byte: int) -> str:
        if pci.BAR0 <= offset < pci.BAR0 + 4 * pci.BAR_COUNT:
            return self._write_bar_byte((offset - pci.BAR0) // 4, offset % 4, byte)
        if pci.ROM_BAR <= offset < pci.ROM_BAR + 4 and self.rom is not None:
            shift = 8 * (offset - pci.ROM_BAR)
            register = (self._rom_register() & ~(0xFF << shift)) | byte << shift
            self.rom_enabled = bool(register & pci.ROM_ENABLE)
            self.rom.address = register & ~(self.rom.size - 1) & 0xFFFFF800
            return "rom"
        if offset == pci.INTERRUPT_LINE:
            self.interrupt_line = byte
            return "line"
        for cap, cap_id in self.capabilities:
            if cap_id == pci.CAP_MSI and cap + 2 <= offset < cap + self.msi.size:
                self.msi.write(offset - cap, 1, byte)
                return "msi"
            if cap_id == pci.CAP_MSIX and cap + 2 <= offset < cap + self.msix.size:
                self.msix.write(offset - cap, 1, byte)
                return "msix"
        return "read-only"  # status, the capability pointers: the guest cannot change them

    # ---- BARs ----------------------------------------------------------------------------
    def _bar_of_register(self, number: int) -> tuple[Bar | None, bool]:
        """The BAR a register belongs to, and whether it is a 64-bit BAR's upper half."""
        if number in self.bars:
            return self.bars[number], False
        lower = self.bars.get(number - 1)
        if lower is not None and lower.is_64:
            return lower, True
        return None, False

    def _bar_register(self, number: int) -> int:
        bar, upper = self._bar_of_register(number)
        if bar is None:
            return 0
        if upper:
            return bar.address >> 32
        return (bar.address & 0xFFFFFFFF & ~(bar.size - 1)) | bar.flags

    def _rom_register(self) -> int:
        if self.rom is None:
            return 0
        return (self.rom.address & 0xFFFFF800) | int(self.rom_enabled)

    def _write_bar_byte(self, number: int, byte_index: int, byte: int) -> str:
        bar, upper = self._bar_of_register(number)
        if bar is None:
            return "read-only"
        shift = 8 * byte_index + (32 if upper else 0)
        address = (bar.address & ~(0xFF << shift)) | byte << shift
        limit = (1 << 64) - 1 if bar.is_64 else 0xFFFFFFFF
        bar.address = address & ~(bar.size - 1) & limit & ~(0x3 if bar.is_io else 0xF)
        return f"bar{bar.index}"

    def _decodes(self, bar: Bar) -> bool:
        if bar.index == 6:
            return bool(self.command & pci.COMMAND_MEMORY) and self.rom_enabled
        return bool(self.command & (pci.COMMAND_IO if bar.is_io else pci.COMMAND_MEMORY))

    def _command_written(self, command: int) -> None:
        self.command = command
        for bar in [*self.bars.values(), *([self.rom] if self.rom else [])]:
            self._bar_moved(bar)

    def _bar_moved(self, bar: Bar) -> None:
        """Make the mapping follow the BAR: unmapped, mapped, or mapped elsewhere."""
        wanted = bar.address if self._decodes(bar) and bar.address else None
        if wanted == bar.mapped_at:
            return
        self._unmap(bar)
        if wanted is not None:
            try:
                self._map(bar)
            except ConfigurationError as error:  # e.g. a guest put it over RAM or another BAR
                self._unmap(bar)
                print(
                    f"pyvmm: warning: {self.device.name} BAR{bar.index}: {error}", file=sys.stderr
                )

    def _map(self, bar: Bar) -> None:
        bar.mapped_at = bar.address
        name = f"{self.device.name} {'ROM' if bar.index == 6 else f'BAR{bar.index}'}"
        fd, region = self.device.fd, bar.region
        if bar.is_io:
            self.pio.add_fd(bar.address, bar.size, fd, region.offset, name)
            bar.ranges.append((self.pio, bar.address))
            return
        for kind, start, length in self._segments(bar):
            base = bar.address + start
            if kind == "mmap":
                mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, offset=region.offset + start)
                buffer = ffi.from_buffer(mapping)
                slot = self.memory_slots.allocate()
                bar.slots.append((slot, base, mapping, buffer))
                host = int(ffi.cast("uintptr_t", buffer))
                self.vm.set_user_memory_region(slot, base, length, host)
            elif kind == "msix":
                self._map_msix_window(bar, base, start, length)
            else:
                self.mmio.add_fd(base, length, fd, region.offset + start, name)
                bar.ranges.append((self.mmio, base))

    def _segments(self, bar: Bar) -> list[tuple[str, int, int]]:
        """Split a memory BAR into runs of pages: mmap'd, MSI-X table window, or trapped.

        The table's pages are the table window; the PBA's pages are trapped (forwarded to
        the device) even where VFIO would let them be mapped, so that every MSI-X access
        is seen by the VMM, as QEMU does it.
        """
        table = pba = None
        msix = self.msix
        if msix is not None and msix.table_bar == bar.index:
            table = (msix.table_offset, msix.table_offset + msix.table_size)
        if msix is not None and msix.pba_bar == bar.index:
            pba = (msix.pba_offset, msix.pba_offset + (msix.entries + 63) // 64 * 8)
        areas = bar.region.mmap_areas if self.mmap_bars and bar.region.can_mmap else ()
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

    def _map_msix_window(self, bar: Bar, base: int, start: int, length: int) -> None:
        msix = self.msix
        window = ffi.new(
            "struct pyvmm_msix_window *",
            {
                "table_offset": msix.table_offset - start,
                "table_size": msix.table_size,
                "table": ffi.from_buffer(msix.table),
            },
        )
        self.msix_window = (bar, start)
        handler = NativeHandler(
            lib.PYVMM_HANDLER_MSIX,
            fd=self.device.fd,
            fd_offset=bar.region.offset + start,
            device=window,
            keep=(window, msix.table),
            python=self._msix_table_written,
        )
        self.mmio.add(base, length, handler, f"{self.device.name} MSI-X table")
        bar.ranges.append((self.mmio, base))

    def _unmap(self, bar: Bar) -> None:
        for slot, base, mapping, buffer in bar.slots:
            self.vm.set_user_memory_region(slot, base, 0, 0)
            self.memory_slots.release(slot)
            ffi.release(buffer)
            mapping.close()
        for bus, base in bar.ranges:
            bus.remove(base)
        bar.slots, bar.ranges, bar.mapped_at = [], [], None

    # ---- interrupts ----------------------------------------------------------------------
    def _enable_intx(self) -> None:
        if self.intx is not None:
            self.intx.enable()
            self.active_irq = INTX

    def _disable_active(self) -> None:
        if self.active_irq == INTX:
            self.intx.disable()
        elif self.active_irq is not None:
            self.device.set_irqs(self.active_irq, NONE_TRIGGER, 0, 0)
            for vector in self.vectors:
                vector.close()
            self.vectors = []
        self.active_irq = None

    def _start_vectors(self, index: int, messages: list[tuple[int, int, bool]]) -> None:
        self._disable_active()
        self.vectors = [MsiVector(self.vm, self.routing, a, d) for a, d, _ in messages]
        for vector, (_, _, masked) in zip(self.vectors, messages, strict=True):
            vector.set_masked(masked)
        self.device.set_irqs(
            index, EVENTFD_TRIGGER, 0, len(self.vectors), [v.eventfd for v in self.vectors]
        )
        self.active_irq = index

    def _msi_messages(self) -> list[tuple[int, int, bool]]:
        msi = self.msi
        return [(msi.address, msi.data(i), msi.masked(i)) for i in range(msi.vectors)]

    def _msi_written(self) -> None:
        msi = self.msi
        if msi.enabled and self.active_irq != MSI:
            self._start_vectors(MSI, self._msi_messages())
        elif not msi.enabled and self.active_irq == MSI:
            self._disable_active()
            self._enable_intx()
        elif msi.enabled:
            for vector, (address, data, masked) in zip(
                self.vectors, self._msi_messages(), strict=False
            ):
                vector.route(address, data)
                vector.set_masked(masked)

    def _msix_control_written(self) -> None:
        msix = self.msix
        if msix.enabled and self.active_irq != MSIX:
            self._start_vectors(MSIX, [self._msix_message(i) for i in range(msix.entries)])
        elif not msix.enabled and self.active_irq == MSIX:
            self._disable_active()
            self._enable_intx()
        elif msix.enabled:
            for vector in range(msix.entries):
                self._msix_entry_changed(vector)

    def _msix_message(self, vector: int) -> tuple[int, int, bool]:
        address, data, masked = self.msix.entry(vector)
        return address, data, masked or self.msix.function_masked

    def _msix_entry_changed(self, vector: int) -> None:
        address, data, masked = self._msix_message(vector)
        self.vectors[vector].route(address, data)
        self.vectors[vector].set_masked(masked)

    def _msix_table_written(self, offset: int, data: Any, is_write: bool) -> None:
        # The C loop already stored the write in the table: only routes need to follow.
        _, start = self.msix_window
        vector = (start + offset - self.msix.table_offset) // MSIX_ENTRY_SIZE
        if self.active_irq == MSIX and 0 <= vector < len(self.vectors):
            self._msix_entry_changed(vector)

    # ---- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Interrupts off, BARs unmapped, the device reset and closed: the reverse of set-up."""
        if self.device.fd < 0:
            return
        with contextlib.suppress(PyvmmError, OSError):
            self._disable_active()
        if self.intx is not None:
            self.intx.close()
        for bar in [*self.bars.values(), *([self.rom] if self.rom else [])]:
            with contextlib.suppress(PyvmmError, OSError):
                self._unmap(bar)
        if self.flags & lib.VFIO_DEVICE_FLAGS_RESET:
            with contextlib.suppress(PyvmmError):
                self.device.reset()
        self.device.close()
