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


#: The 8259 IRQs of PCI interrupt links A-D, as SeaBIOS routes them on QEMU's machines (its
#: pciinit.c, pci_irqs): links A and B to IRQ 10, C and D to IRQ 11.
LINK_IRQS = (10, 10, 11, 11)
#: The IRQs QEMU's tables declare for PCI, level-triggered and active-high (its pci_irq_mask:
#: the links' possible IRQs 5, 10 and 11, and the SCI, 9): each has an MADT override.
PCI_IRQS = (5, 9, 10, 11)


def intx_link(slot: int, pin: int) -> int:
    """The interrupt link (0 = A ... 3 = D) that INTx pin (1 = INTA) of a slot is wired to.

    The PIIX rotation, as SeaBIOS and QEMU's i440fx wire bus 0: slot 1's INTA is link A,
    slot 2's link B, and so on around the four links (docs/guest-abi.md).
    """
    return (slot - 1 + pin - 1) % 4


def intx_irq(slot: int, pin: int) -> int:
    """The IRQ (8259 input and IOAPIC pin alike) that INTx pin of a slot drives."""
    return LINK_IRQS[intx_link(slot, pin)]


def level_triggered_irqs() -> tuple[int, ...]:
    """The IRQs the ELCR marks level-triggered: every one a link is routed to, as SeaBIOS."""
    return tuple(sorted(set(LINK_IRQS)))
