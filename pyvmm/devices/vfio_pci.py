"""An assigned PCI device or mdev: a real device behind VFIO, on the guest's PCI bus.

The guest sees the device's own configuration space, except where the VMM must own it:

- BARs and the expansion ROM BAR: pyvmm placed them (pci/resources.py) and emulates sizing
  and moves; vfio_pci_bars.py maps them (KVM memory slots, or traps served in C) wherever
  the guest puts them, or refuses a place that is taken or cannot exist.
- MSI and MSI-X: emulated (pci/msi.py); each vector is an eventfd that VFIO signals and a KVM
  irqfd on a GSI whose MSI route follows the guest's address, data and mask bits.
- INTx: an eventfd VFIO signals, a KVM irqfd with a resample eventfd on the GSI pyvmm wired
  the pin to (pci/config.py), and VFIO unmask on each resample, so the level-triggered line
  re-arms after every EOI.
- The capability list shows only what pyvmm supports (MSI, MSI-X, power management, PCI
  Express); the extended space reads as empty. Every other access goes to the device.

Nothing the guest writes ends the run. What the host refuses (a BAR over RAM, an interrupt
set-up VFIO or KVM rejects) leaves the guest a device that does not decode there or whose
interrupt does not arrive, as QEMU's vfio-pci reports an error and carries on, and records
a one-line warning (``warnings``) that the CLI prints at the end of the run. A trapped BAR
access the device refuses reads as all ones or is dropped, with a warning per BAR.

One device, one file, as in kvmtool: set-up, configuration space, BARs, interrupts, teardown.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from typing import Any

from pyvmm._native import lib
from pyvmm.bus import Bus
from pyvmm.devices.vfio_pci_bars import Bar, BarMapper, BarRefusedError
from pyvmm.errors import PyvmmError
from pyvmm.irq import EVENTFD_TRIGGER, NONE_TRIGGER, GsiRouting, IntxLine, MsiVector
from pyvmm.kvm import Vm
from pyvmm.memory import MemorySlots
from pyvmm.pci import config as pci
from pyvmm.pci.msi import MSIX_ENTRY_SIZE, MsiCapability, MsixCapability
from pyvmm.pci.resources import PciResources
from pyvmm.vfio import VfioDevice

CONFIG = lib.VFIO_PCI_CONFIG_REGION_INDEX
INTX, MSI, MSIX = (
    lib.VFIO_PCI_INTX_IRQ_INDEX,
    lib.VFIO_PCI_MSI_IRQ_INDEX,
    lib.VFIO_PCI_MSIX_IRQ_INDEX,
)
PM_STATE_D0, PM_STATE_D3HOT = 0, 3
IRQ_NAMES = {INTX: "INTx", MSI: "MSI", MSIX: "MSI-X"}
EXPOSED_CAPABILITIES = {pci.CAP_POWER_MANAGEMENT, pci.CAP_MSI, pci.CAP_EXPRESS, pci.CAP_MSIX}
#: Distinct warnings kept per device; a guest hammering bad values gets a count beyond them.
MAX_WARNINGS = 16


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
        guest_ram: Sequence[tuple[int, int]] = (),
        label: str = "",
    ) -> None:
        """guest_ram: the (base, size) ranges of guest RAM, where no BAR may be decoded;
        label: the device as the user named it (default: its VFIO name)."""
        self.device, self.slot, self.vm, self.pio, self.mmio = device, slot, vm, pio, mmio
        self.label = label or device.name
        self.routing = routing
        self.mapper = BarMapper(
            device_name=device.name,
            fd=device.fd,
            vm=vm,
            pio=pio,
            mmio=mmio,
            slots=slots,
            mmap_bars=mmap_bars,
            guest_ram=guest_ram,
        )
        #: One line each, for the end of the run: what pyvmm refused or could not set up.
        self.warnings: list[str] = []
        self.warnings_dropped = 0
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
        self.interrupt_line = pci.intx_irq(self.slot, pin) if 1 <= pin <= 4 else 0xFF
        if 1 <= pin <= 4 and device.get_irq_info(INTX).count:
            self.intx = IntxLine(device, self.vm, self.interrupt_line)
            self.intx.enable()  # at set-up a failure is the assignment's, not the guest's
            self.active_irq = INTX
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
        #: Where the power management control/status register is (0: no PM capability).
        self.power_control = 0
        self.power_state = PM_STATE_D0
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
            elif cap_id == pci.CAP_POWER_MANAGEMENT:
                self.power_control = offset + pci.PM_CONTROL
            offset = self._device_read(offset + 1, 1) & 0xFC

    # ---- configuration space ------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        """The guest's view: the device's registers with pyvmm's own overlaid.

        A read the device fails reads as all ones, as from a function that went away.
        """
        if offset >= pci.CONFIG_SPACE_SIZE:
            return 0
        try:
            return self._config_read(offset, size)
        except (PyvmmError, OSError) as error:
            self.warn(f"config read at {offset:#x} failed: {_reason(error)}; read as all ones")
            return (1 << 8 * size) - 1

    def _config_read(self, offset: int, size: int) -> int:
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
        """Apply a guest write: to pyvmm's registers where emulated, else to the device.

        Whatever the guest writes, the run goes on: what cannot be done is a warning.
        """
        if offset >= pci.CONFIG_SPACE_SIZE:
            return
        try:
            self._config_write(offset, size, value)
        except (PyvmmError, OSError) as error:
            self.warn(
                f"config write of {value:#x} ({size} bytes) at {offset:#x} failed: "
                f"{_reason(error)}; ignored"
            )

    def _config_write(self, offset: int, size: int, value: int) -> None:
        msi_was_enabled = self.msi is not None and self.msi.enabled
        msix_was_enabled = self.msix is not None and self.msix.enabled
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
        if self.power_control and offset <= self.power_control < offset + size:
            self._power_state_written(value >> 8 * (self.power_control - offset) & 0xFF)
        for what in touched:
            if what.startswith("bar"):
                self._bar_moved(self.bars[int(what[3:])])
            elif what == "rom" and self.rom is not None:
                self._bar_moved(self.rom)
            elif what == "msi":
                self._msi_written(msi_was_enabled)
            elif what == "msix":
                self._msix_control_written(msix_was_enabled)

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

    def _power_state_written(self, control: int) -> None:
        # VFIO puts the device in the state asked for and, from D3hot on, revokes the BARs'
        # mmaps and refuses their reads and writes: a memory slot there would make KVM_RUN
        # fail (EFAULT). So in D3hot nothing decodes, as the PCI spec has it.
        state = control & pci.PM_STATE_MASK
        if state != self.power_state:
            self.power_state = state
            self._command_written(self.command)

    def _decodes(self, bar: Bar) -> bool:
        if self.power_state >= PM_STATE_D3HOT:
            return False
        if bar.index == 6:
            return bool(self.command & pci.COMMAND_MEMORY) and self.rom_enabled
        return bool(self.command & (pci.COMMAND_IO if bar.is_io else pci.COMMAND_MEMORY))

    def _command_written(self, command: int) -> None:
        self.command = command
        for bar in self._all_bars():
            self._bar_moved(bar)

    def _bar_moved(self, bar: Bar) -> None:
        """Make the mapping follow the BAR: unmapped, mapped, mapped elsewhere, or refused."""
        wanted = bar.address if self._decodes(bar) and bar.address else None
        if wanted == bar.mapped_at or (wanted is not None and wanted == bar.refused_at):
            return
        self.mapper.unmap(bar)
        bar.refused_at = None
        if wanted is None:
            return
        try:
            self.mapper.map(bar, self.msix, self._msix_table_written)
        except BarRefusedError as error:  # e.g. a guest put it over RAM or another BAR
            bar.refused_at = wanted
            self.warn(
                f"{bar.name} at {wanted:#x} refused: {error.message}; "
                "not decoded there until the guest moves it"
            )

    # ---- interrupts ----------------------------------------------------------------------
    # As in QEMU's vfio-pci, an enable bit the guest sets or clears (an edge) starts or stops
    # the vectors; a set-up VFIO or KVM refuses leaves the guest's bit as it wrote it, no
    # vector wired, INTx back on, everything allocated for it released, and a warning.
    def _enable_intx(self) -> None:
        if self.intx is None:
            return
        try:
            self.intx.enable()
        except PyvmmError as error:
            self.warn(f"INTx enable failed: {error.message}; no INTx reaches the guest")
            return
        self.active_irq = INTX

    def _disable_active(self) -> None:
        active, self.active_irq = self.active_irq, None
        vectors, self.vectors = self.vectors, []
        try:
            if active == INTX:
                self.intx.disable()
            elif active is not None:
                self.device.set_irqs(active, NONE_TRIGGER, 0, 0)
        finally:
            for vector in vectors:
                with contextlib.suppress(PyvmmError, OSError):
                    vector.close()  # the eventfd and GSI go even where KVM refuses a step

    def _start_vectors(self, index: int, messages: list[tuple[int, int, bool]]) -> None:
        self._disable_active()
        vectors: list[MsiVector] = []
        try:
            for address, data, masked in messages:
                vectors.append(MsiVector(self.vm, self.routing, address, data))
                vectors[-1].set_masked(masked)
            self.device.set_irqs(
                index, EVENTFD_TRIGGER, 0, len(vectors), [v.eventfd for v in vectors]
            )
        except (PyvmmError, OSError) as error:
            for vector in vectors:
                with contextlib.suppress(PyvmmError, OSError):
                    vector.close()
            kind = IRQ_NAMES[index]
            self.warn(
                f"{kind} enable with {len(messages)} vectors failed: {_reason(error)}; "
                f"no {kind} interrupt reaches the guest"
            )
            self._enable_intx()
            return
        self.vectors, self.active_irq = vectors, index

    def _follow(self, number: int, message: tuple[int, int, bool]) -> None:
        """Point vector number at the guest's new message, or keep the old route and warn."""
        address, data, masked = message
        vector = self.vectors[number]
        try:
            vector.route(address, data)
            vector.set_masked(masked)
        except PyvmmError as error:
            self.warn(
                f"{IRQ_NAMES[self.active_irq]} vector {number} to address {address:#x} data "
                f"{data:#x}: {error.message}; it keeps its last route"
            )

    def _msi_messages(self) -> list[tuple[int, int, bool]]:
        msi = self.msi
        return [(msi.address, msi.data(i), msi.masked(i)) for i in range(msi.vectors)]

    def _msi_written(self, was_enabled: bool) -> None:
        msi = self.msi
        if msi.enabled and not was_enabled:
            self._start_vectors(MSI, self._msi_messages())
        elif was_enabled and not msi.enabled:
            if self.active_irq == MSI:
                self._disable_active()
                self._enable_intx()
        elif msi.enabled and self.active_irq == MSI:
            for number, message in enumerate(self._msi_messages()[: len(self.vectors)]):
                self._follow(number, message)

    def _msix_control_written(self, was_enabled: bool) -> None:
        msix = self.msix
        if msix.enabled and not was_enabled:
            self._start_vectors(MSIX, [self._msix_message(i) for i in range(msix.entries)])
        elif was_enabled and not msix.enabled:
            if self.active_irq == MSIX:
                self._disable_active()
                self._enable_intx()
        elif msix.enabled and self.active_irq == MSIX:
            for number in range(len(self.vectors)):
                self._follow(number, self._msix_message(number))

    def _msix_message(self, vector: int) -> tuple[int, int, bool]:
        address, data, masked = self.msix.entry(vector)
        return address, data, masked or self.msix.function_masked

    def _msix_table_written(self, offset: int, data: Any, is_write: bool) -> None:
        # The C loop already stored the write in the table: only routes need to follow.
        window = self.mapper.msix_window
        if window is None:
            return
        vector = (window[1] + offset - self.msix.table_offset) // MSIX_ENTRY_SIZE
        if self.active_irq == MSIX and 0 <= vector < len(self.vectors):
            self._follow(vector, self._msix_message(vector))

    # ---- warnings ------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        """Record a one-line warning about this device for the end of the run."""
        line = f"{self.device.name}: {message}"
        if line in self.warnings:
            return
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(line)
        else:
            self.warnings_dropped += 1

    def _all_bars(self) -> list[Bar]:
        """The BARs, then the expansion ROM if the device has one."""
        return [*self.bars.values(), *([self.rom] if self.rom else [])]

    def warning_lines(self) -> list[str]:
        """The warnings to print, one line each; past MAX_WARNINGS, a count of the rest; then
        one line per BAR with trapped accesses the device refused."""
        lines = list(self.warnings)
        if self.warnings_dropped:
            lines.append(f"{self.device.name}: {self.warnings_dropped} more warnings like these")
        for bar in self._all_bars():
            line = self._fault_line(bar)
            if line:
                lines.append(line)
        return lines

    def _fault_line(self, bar: Bar) -> str | None:
        first = bar.faults.first
        if first is None:
            return None
        count = bar.faults.count
        access = f"{'write' if first.is_write else 'read'} of {first.size} bytes"
        error = f"{errno.errorcode.get(first.errno, first.errno)} ({os.strerror(first.errno)})"
        return (
            f"{self.label}: {bar.name}: {count} access{'es' if count != 1 else ''} refused by "
            f"the device, the first a {access} at offset {first.fd_offset - bar.region.offset:#x}"
            f": {error}; the guest read all ones and its writes were dropped"
        )

    # ---- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Interrupts off, BARs unmapped, the device reset and closed: the reverse of set-up."""
        if self.device.fd < 0:
            return
        with contextlib.suppress(PyvmmError, OSError):
            self._disable_active()
        if self.intx is not None:
            self.intx.close()
        for bar in self._all_bars():
            with contextlib.suppress(PyvmmError, OSError):
                self.mapper.unmap(bar)
        self.mapper.close()
        if self.flags & lib.VFIO_DEVICE_FLAGS_RESET:
            with contextlib.suppress(PyvmmError):
                self.device.reset()
        self.device.close()


def _reason(error: BaseException) -> str:
    return error.message if isinstance(error, PyvmmError) else str(error)
