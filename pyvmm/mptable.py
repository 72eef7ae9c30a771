"""The Intel MultiProcessor Specification 1.4 tables, as SeaBIOS writes them for QEMU.

Older kernels, and test kernels that predate ACPI or skip it, find the CPUs and the IOAPIC
here. Guest-physical layout (docs/guest-abi.md):

    0xF0000  the MP floating pointer structure ("_MP_", 16 bytes, checksummed)
    0xF0010  the MP configuration table ("PCMP", checksummed) and its entries

The floating pointer is in the BIOS ROM area (0xF0000-0xFFFFF), one of the three places the
spec tells an OS to search on 16-byte boundaries; the ACPI tables (acpi.py) keep below
0xF0000. The configuration table holds, in the order the spec requires:

- one processor entry per vCPU: local APIC ID = vCPU index, enabled, vCPU 0 the
  bootstrap processor; the local APIC version is KVM's (0x14);
- two buses: PCI bus 0 (bus ID 0) and ISA (bus ID 1), as SeaBIOS numbers them;
- KVM's IOAPIC: ID 0, version 0x11, at 0xFEC00000 (acpi.py's MADT says the same);
- I/O interrupt entries: ISA IRQs 0-15 to the IOAPIC pins of the same number, except IRQ 0
  to pin 2 (the PC's timer override; source IRQ 2, the 8259 cascade, is then left out),
  IRQ 9, the ACPI SCI, active-high and level-triggered as in the MADT, and IRQs 5, 10 and
  11 left out, as SeaBIOS leaves them out: they are PCI's; then INTA-INTD of every PCI slot
  to the IRQ pci/config.py routes it to (intx_irq, the same IOAPIC pin), active-high and
  level-triggered (the PCI bus's trigger mode), as SeaBIOS writes them and as the MADT's
  overrides for those IRQs say (KVM's IOAPIC ignores polarity anyway);
- local interrupt entries: ExtINT (the 8259s) on LINT0 of the BSP, NMI on LINT1 of all.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pyvmm.acpi import IOAPIC_ADDRESS, IOAPIC_ID, LOCAL_APIC_ADDRESS, SCI_IRQ
from pyvmm.errors import ConfigurationError
from pyvmm.layout import MP_CONFIG_TABLE_ADDRESS, MP_TABLE
from pyvmm.pci.config import PCI_IRQS, intx_irq
from pyvmm.pci.host import SLOTS

if TYPE_CHECKING:
    from pyvmm.memory import GuestMemory

FLOATING_POINTER_ADDRESS = MP_TABLE.start
CONFIG_TABLE_ADDRESS = MP_CONFIG_TABLE_ADDRESS
MP_AREA_END = MP_TABLE.end
SPEC_REVISION = 4  # MP spec 1.4

OEM_ID = b"PYVMM   "
PRODUCT_ID = b"0.1         "
LOCAL_APIC_VERSION = 0x14  # what KVM's local APIC version register reads
IOAPIC_VERSION = 0x11  # KVM's IOAPIC version register
#: CPUID leaf 1 EAX and EDX for the processor entries where the caller has nothing better:
#: SeaBIOS's own fallback, family 6 with FPU and APIC.
DEFAULT_CPU_SIGNATURE = 0x600
DEFAULT_CPU_FEATURES = 0x201

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
CPU_ENABLED, CPU_BOOTSTRAP = 0x01, 0x02
INT, NMI, SMI, EXTINT = range(4)
PCI_BUS_ID, ISA_BUS_ID = 0, 1
#: I/O interrupt flags: polarity in bits 0-1, trigger mode in bits 2-3; 0 conforms to the
#: source bus (ISA: edge, active high; PCI: level, active low).
CONFORMS = 0x0
#: Active high, trigger mode of the bus (PCI: level), as SeaBIOS flags its PCI entries.
ACTIVE_HIGH = 0x1
ACTIVE_HIGH_LEVEL = 0xD
ALL_LOCAL_APICS = 0xFF

HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # the configuration table header, 44 bytes


def _checksum(data: bytes | bytearray) -> int:
    return -sum(data) & 0xFF


def _io_interrupt(flags: int, bus: int, bus_irq: int, pin: int) -> bytes:
    return struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, INT, flags, bus, bus_irq, IOAPIC_ID, pin)


def build_mp_table(
    cpus: int,
    *,
    cpu_signature: int = DEFAULT_CPU_SIGNATURE,
    cpu_features: int = DEFAULT_CPU_FEATURES,
) -> tuple[bytes, bytes]:
    """Return (floating pointer, configuration table) for cpus vCPUs, for the addresses
    FLOATING_POINTER_ADDRESS and CONFIG_TABLE_ADDRESS."""
    if not 1 <= cpus <= 0xFE:
        raise ConfigurationError(f"an MP table describes 1 to 254 processors, not {cpus}")
    entries: list[bytes] = []
    for index in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if index == 0 else 0)
        entries.append(
            struct.pack(
                "<BBBBII8x", ENTRY_PROCESSOR, index, LOCAL_APIC_VERSION, flags,
                cpu_signature, cpu_features,
            )
        )  # fmt: skip
    entries.append(struct.pack("<BB6s", ENTRY_BUS, PCI_BUS_ID, b"PCI   "))
    entries.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(
        struct.pack("<BBBBI", ENTRY_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, 1, IOAPIC_ADDRESS)
    )
    for irq in range(16):
        if irq == 2:
            continue  # the cascade: pin 2 is IRQ 0's
        if irq in PCI_IRQS and irq != SCI_IRQ:
            continue  # PCI's, level-triggered: the PCI entries below name them
        pin = 2 if irq == 0 else irq
        flags = ACTIVE_HIGH_LEVEL if irq == SCI_IRQ else CONFORMS
        entries.append(_io_interrupt(flags, ISA_BUS_ID, irq, pin))
    for slot in range(1, SLOTS):
        for pin in range(1, 5):
            # A PCI source is (device << 2) | (INTA = 0 ... INTD = 3).
            entries.append(_io_interrupt(ACTIVE_HIGH, PCI_BUS_ID, slot << 2 | (pin - 1),
                                         intx_irq(slot, pin)))  # fmt: skip
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, EXTINT, CONFORMS,
                               ISA_BUS_ID, 0, 0, 0))  # fmt: skip
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, NMI, CONFORMS,
                               ISA_BUS_ID, 0, ALL_LOCAL_APICS, 1))  # fmt: skip
    body = b"".join(entries)
    table = bytearray(
        HEADER.pack(
            b"PCMP", HEADER.size + len(body), SPEC_REVISION, 0, OEM_ID, PRODUCT_ID,
            0, 0, len(entries), LOCAL_APIC_ADDRESS, 0, 0, 0,
        )
    )  # fmt: skip
    table += body
    table[7] = _checksum(table)
    # Floating pointer: signature, table address, length in 16-byte units, revision,
    # checksum, feature bytes 1-5. Feature byte 1 = 0: the table above is present (no
    # default configuration); byte 2 bit 7 (IMCR present) = 0: virtual wire mode, as KVM.
    floating = bytearray(
        struct.pack("<4sIBBB5B", b"_MP_", CONFIG_TABLE_ADDRESS, 1, SPEC_REVISION, 0, 0, 0, 0, 0, 0)
    )
    floating[10] = _checksum(floating)
    return bytes(floating), bytes(table)


def write_mp_table(
    memory: GuestMemory,
    cpus: int,
    *,
    cpu_signature: int = DEFAULT_CPU_SIGNATURE,
    cpu_features: int = DEFAULT_CPU_FEATURES,
) -> int:
    """Write the MP tables into guest RAM (0xF0000 up); returns the floating pointer's address.

    cpu_signature and cpu_features are CPUID leaf 1's EAX and EDX for the processor entries.
    """
    floating, table = build_mp_table(cpus, cpu_signature=cpu_signature, cpu_features=cpu_features)
    if CONFIG_TABLE_ADDRESS + len(table) > MP_AREA_END:
        raise ConfigurationError("the MP table does not fit below 1 MiB")
    if not memory.contains(FLOATING_POINTER_ADDRESS, MP_AREA_END - FLOATING_POINTER_ADDRESS):
        raise ConfigurationError("the MP table needs guest RAM at 0xF0000-0xFFFFF")
    memory.fill(FLOATING_POINTER_ADDRESS, MP_AREA_END - FLOATING_POINTER_ADDRESS)
    memory.write(FLOATING_POINTER_ADDRESS, floating)
    memory.write(CONFIG_TABLE_ADDRESS, table)
    return FLOATING_POINTER_ADDRESS
