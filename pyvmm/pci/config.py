"""The PCI configuration space layout, and the interface a function on the bus implements."""

from __future__ import annotations

from typing import Protocol

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
CLASS_REVISION = 0x08
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
ROM_BAR = 0x30
CAPABILITY_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
#: The standard header and capabilities; the extended space (PCIe) starts here.
CONFIG_SPACE_SIZE = 0x100
ECAM_FUNCTION_SIZE = 0x1000

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_BUS_MASTER = 0x4
COMMAND_INTX_DISABLE = 0x400
STATUS_CAPABILITIES = 0x10

BAR_IO = 0x1
BAR_MEMORY_64 = 0x4
BAR_PREFETCHABLE = 0x8
ROM_ENABLE = 0x1

CAP_POWER_MANAGEMENT = 0x01
#: In the power management capability: the control/status register and its power state.
PM_CONTROL = 0x4
PM_STATE_MASK = 0x3
CAP_MSI = 0x05
CAP_EXPRESS = 0x10
CAP_MSIX = 0x11

#: MSI message address of the local APIC window (docs/guest-abi.md).
MSI_ADDRESS_BASE = 0xFEE0_0000


class PciFunction(Protocol):
    """A function on the guest's PCI bus: its configuration space, read and written."""

    def config_read(self, offset: int, size: int) -> int:
        """Return size (1, 2 or 4) bytes at offset, little-endian."""
        ...

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write size bytes at offset."""
        ...


def intx_gsi(slot: int, pin: int) -> int:
    """The IOAPIC pin that INTx pin (1 = INTA) of a slot is wired to (docs/guest-abi.md)."""
    return 16 + (slot + pin - 1) % 8
