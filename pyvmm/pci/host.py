"""Bus 0: the host bridge at 00:00.0, configuration mechanism #1 and ECAM.

Both access methods end in the same ``PciFunction`` calls. Configuration space accesses are
rare (a guest enumerates once and programs a few registers), so they are served in Python.
"""

from __future__ import annotations

from pyvmm.bus import Bus
from pyvmm.errors import ConfigurationError
from pyvmm.memory import ECAM_BASE, ECAM_SIZE
from pyvmm.pci.config import (
    CLASS_REVISION,
    CONFIG_SPACE_SIZE,
    DEVICE_ID,
    ECAM_FUNCTION_SIZE,
    HEADER_TYPE,
    VENDOR_ID,
    PciFunction,
)

CONF1_ADDRESS_PORT = 0xCF8
CONF1_DATA_PORT = 0xCFC
CONF1_ENABLE = 1 << 31
SLOTS = 32

#: The host bridge's identity: Red Hat's "QEMU PCIe host bridge", class 06:00:00.
HOST_BRIDGE_VENDOR = 0x1B36
HOST_BRIDGE_DEVICE = 0x0008


class HostBridge:
    """00:00.0: an identity and nothing else (read-only)."""

    def __init__(self) -> None:
        self.space = bytearray(CONFIG_SPACE_SIZE)
        self.space[VENDOR_ID : VENDOR_ID + 2] = HOST_BRIDGE_VENDOR.to_bytes(2, "little")
        self.space[DEVICE_ID : DEVICE_ID + 2] = HOST_BRIDGE_DEVICE.to_bytes(2, "little")
        self.space[CLASS_REVISION : CLASS_REVISION + 4] = (0x06000000).to_bytes(4, "little")
        self.space[HEADER_TYPE] = 0

    def config_read(self, offset: int, size: int) -> int:
        """Read the bridge's fixed registers (the extended space reads as zero)."""
        return int.from_bytes(self.space[offset : offset + size].ljust(size, b"\0"), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Writes are ignored: nothing in the bridge is programmable."""


class PciBus:
    """Bus 0 of the guest, reached through ports 0xCF8/0xCFC and ECAM at 0xE000_0000."""

    def __init__(self, pio: Bus, mmio: Bus) -> None:
        self.functions: dict[int, PciFunction] = {0: HostBridge()}
        self.address = 0
        # 0xCF9 between them is the reset control register (devices/power.py): a dword
        # access at 0xCF8 still arrives here whole, as on a PC chipset.
        pio.add(CONF1_ADDRESS_PORT, 1, self._conf1, "PCI conf1")
        pio.add(CONF1_ADDRESS_PORT + 2, 2, self._conf1_spare, "PCI conf1")
        pio.add(CONF1_DATA_PORT, 4, self._conf1_data, "PCI conf1 data")
        mmio.add(ECAM_BASE, ECAM_SIZE, self._ecam, "PCI ECAM")

    def next_free_slot(self) -> int:
        """The lowest slot nothing occupies."""
        for slot in range(1, SLOTS):
            if slot not in self.functions:
                return slot
        raise ConfigurationError(f"the guest's PCI bus is full ({SLOTS - 1} devices at most)")

    def add(self, slot: int, function: PciFunction) -> None:
        """Plug a function in at slot (function 0)."""
        if slot in self.functions:
            raise ConfigurationError(f"PCI slot {slot} is taken")
        self.functions[slot] = function

    def _access(self, bus: int, slot: int, function: int, offset: int, data, is_write: bool):
        size = len(data)
        target = self.functions.get(slot) if bus == 0 and function == 0 else None
        if is_write:
            if target is not None:
                target.config_write(offset, size, int.from_bytes(data, "little"))
            return
        value = target.config_read(offset, size) if target is not None else (1 << 8 * size) - 1
        data[:] = value.to_bytes(size, "little")

    def _conf1_spare(self, offset: int, data, is_write: bool) -> None:
        self._conf1(offset + 2, data, is_write)

    def _conf1_data(self, offset: int, data, is_write: bool) -> None:
        self._conf1(offset + 4, data, is_write)

    def _conf1(self, offset: int, data, is_write: bool) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            if is_write:
                self.address = int.from_bytes(data, "little")
            else:
                data[:] = self.address.to_bytes(4, "little")
            return
        if offset < 4 or not self.address & CONF1_ENABLE:
            # Only a dword at 0xCF8 is the address latch; other widths there are not ours.
            if not is_write:
                data[:] = b"\xff" * size
            return
        address = self.address
        register = (address & 0xFC) + (offset - 4)
        bus, slot, function = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 7
        self._access(bus, slot, function, register, data, is_write)

    def _ecam(self, offset: int, data, is_write: bool) -> None:
        bus, slot, function = offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7
        register = offset & (ECAM_FUNCTION_SIZE - 1)
        if register + len(data) > ECAM_FUNCTION_SIZE or register % len(data):
            if not is_write:
                data[:] = b"\xff" * len(data)
            return
        self._access(bus, slot, function, register, data, is_write)
