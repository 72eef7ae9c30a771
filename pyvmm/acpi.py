"""ACPI tables, built as PC firmware publishes them, for guests that look for them.

Guest-physical layout, all in the BIOS area that an OS searches (docs/guest-abi.md):

    0xE0000  RSDP    revision 2: the 32-bit RSDT and the 64-bit XSDT address, two checksums
    0xE0040  FACS    64-byte aligned, as the spec requires (no checksum of its own)
    0xE0080  DSDT, FADT ("FACP"), MADT ("APIC"), MCFG, RSDT, XSDT, in that order, each on a
             16-byte boundary (a few KiB in all, 64 vCPUs included)
    0xF0000  not ours: the MP table (mptable.py) starts there

An OS finds the RSDP by scanning 0xE0000-0xFFFFF on 16-byte boundaries for "RSD PTR ", so
it sits at the first place looked. The RSDP points at both root tables: an ACPI 2.0+ OS
takes the XSDT, an older or 32-bit-only parser the RSDT; both list FADT, MADT and MCFG, and
the FADT leads to the FACS and the DSDT.

What the tables describe is pyvmm's machine:

- MADT: one enabled local APIC per vCPU (ACPI processor UID and APIC ID = vCPU index, as
  KVM reports them in CPUID), the local APICs at 0xFEE00000, the 8259 pair (PCAT_COMPAT),
  KVM's IOAPIC with ID 0 at 0xFEC00000 from GSI 0 (QEMU's ACPI_BUILD_IOAPIC_ID, and what the
  in-kernel IOAPIC's ID register holds after reset), ISA IRQ 0 overridden to GSI 2 (the
  PIT is wired to IOAPIC pin 2 on a PC), IRQs 5, 9 (the SCI), 10 and 11 level-triggered
  active-high as QEMU declares them (the IRQs PCI INTx is routed to: pci/config.py), and NMI
  on LINT1 of every local APIC.
- FADT (revision 6.0, 276 bytes; not hardware-reduced): the PM1a event block at
  port 0x600 (``add_pm1_event_block`` serves it) and the PM1a control block at port 0x604
  (devices/power.py: a write with SLP_EN powers off), SCI on IRQ 9, no SMI command port
  (the machine is always in ACPI mode), no PM timer, GPE or C2/C3, the reset register at
  port 0xCF9 with value 0x06 (devices/power.py), the RTC century at CMOS 0x32.
- MCFG: PCI segment 0's ECAM at 0xE0000000 for buses 0-255 (pci/host.py).
- DSDT, hand-assembled AML: a Processor device (ACPI0007) per vCPU; the PCI root bridge
  \\_SB.PCI0 (PNP0A08, compatible PNP0A03, segment 0, bus 0) whose _CRS gives the bus
  range, the configuration ports 0xCF8-0xCFF and the windows pyvmm places BARs in
  (pci/resources.py), whose _PRT gives the INTx wiring (pci/config.py: intx_irq); a PNP0C02
  device reserving the ECAM window (Linux uses MCFG only where the area is reserved); and
  \\_S5 with SLP_TYPa = 0, so an OS powers off by writing 0x2000 to port 0x604, the
  value docs/guest-abi.md already gives.

``build_acpi_tables`` is pure (tests check the bytes without guest RAM);
``write_acpi_tables`` puts them into a guest's memory and returns the RSDP's address.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.errors import ConfigurationError
from pyvmm.layout import (
    ACPI_TABLES,
    ACPI_TABLES_START,
    FACS_ADDRESS,
    RSDP_ADDRESS,
    high_window,
)
from pyvmm.pci.config import PCI_IRQS, intx_irq
from pyvmm.pci.host import ECAM_BASE, ECAM_SIZE, SLOTS
from pyvmm.pci.resources import IO_WINDOW, MEMORY_WINDOW

if TYPE_CHECKING:
    from pyvmm.bus import Bus
    from pyvmm.memory import GuestMemory

# ---- where things are ------------------------------------------------------------------
#: The ACPI tables end below here; the MP table follows (layout.py).
ACPI_AREA_END = ACPI_TABLES.end

LOCAL_APIC_ADDRESS = 0xFEE0_0000
IOAPIC_ADDRESS = 0xFEC0_0000
#: KVM's in-kernel IOAPIC reads ID 0 after reset; QEMU's tables say 0 too.
IOAPIC_ID = 0
PM1A_EVENT_PORT = 0x600
PM1A_CONTROL_PORT = 0x604  # devices/power.py
RESET_PORT = 0xCF9  # devices/power.py
RESET_VALUE = 0x06  # "hard reset": CPU reset (bit 2) and system reset (bit 1), as Linux writes
SCI_IRQ = 9
#: CMOS index of the RTC's century register (devices/cmos.py), as on QEMU.
RTC_CENTURY_INDEX = 0x32
#: \_S5's SLP_TYPa: any value with SLP_EN powers pyvmm off; 0 is QEMU's and makes the
#: OS's write 0x2000, docs/guest-abi.md's power-off value.
S5_SLEEP_TYPE = 0

# ---- the common table header (ACPI 6.5, 5.2.6) -----------------------------------------
OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMM   "
OEM_REVISION = 1
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 36 bytes; the checksum is byte 9
CHECKSUM_OFFSET = 9

FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_LENGTH = 276  # ACPI 6.0: up to the hypervisor vendor identity
MADT_REVISION = 3  # ACPI 5.0
DSDT_REVISION = 2  # 2 and up: AML integers are 64-bit

# FADT flags (ACPI 6.5, table 5.10) and IA-PC boot architecture flags (table 5.11).
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_RTC_S4 = 1 << 7
FADT_RESET_REG_SUP = 1 << 10
FADT_FORCE_APIC_CLUSTER_MODEL = 1 << 18
FADT_HW_REDUCED_ACPI = 1 << 20
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2

# Generic Address Structure: space IDs and access sizes.
GAS = struct.Struct("<BBBBQ")
SPACE_SYSTEM_IO = 1
ACCESS_UNDEFINED, ACCESS_BYTE = 0, 1

# MADT structure types and flags.
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_INTERRUPT_OVERRIDE, MADT_LOCAL_APIC_NMI = 0, 1, 2, 4
MADT_PCAT_COMPAT = 1
MADT_ENABLED = 1
MPS_INTI_CONFORMS = 0
MPS_INTI_ACTIVE_HIGH_LEVEL = 0xD  # polarity 01 (high), trigger mode 11 (level)


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes data (with that byte 0) sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def sdt(signature: bytes, revision: int, body: bytes | bytearray) -> bytes:
    """A system description table: the 36-byte header, then body, checksummed."""
    table = bytearray(
        SDT_HEADER.pack(
            signature,
            SDT_HEADER.size + len(body),
            revision,
            0,
            OEM_ID,
            OEM_TABLE_ID,
            OEM_REVISION,
            CREATOR_ID,
            CREATOR_REVISION,
        )
    )
    table += body
    table[CHECKSUM_OFFSET] = _checksum(table)
    return bytes(table)


def gas_io(port: int, width_bytes: int, access: int = ACCESS_UNDEFINED) -> bytes:
    """A Generic Address Structure for width_bytes of system I/O space at port."""
    return GAS.pack(SPACE_SYSTEM_IO, 8 * width_bytes, 0, access, port)


# ---- AML, hand-assembled (ACPI 6.5, chapter 20) ----------------------------------------
# Each helper returns the bytes of one construct; they nest like the ASL they stand for.
# The ASL each DSDT piece corresponds to is in the comments of build_dsdt.

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, QWORD_PREFIX, STRING_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E, 0x0D
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x2E, 0x2F


def aml_pkg_length(body_length: int) -> bytes:
    """PkgLength for a body of body_length bytes: the count includes its own 1-4 bytes.

    One byte holds up to 63. Longer ones take 1-3 more bytes: the lead byte's top two bits
    count them, its low nibble holds the length's low 4 bits, each further byte 8 more.
    """
    if body_length + 1 < 0x40:
        return bytes([body_length + 1])
    for extra in (1, 2, 3):
        total = body_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = extra << 6 | (total & 0xF)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"an AML package of {body_length} bytes is too long")


def aml_name_seg(name: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does (_S5 -> _S5_)."""
    if not 1 <= len(name) <= 4 or not (name[0].isupper() or name[0] == "_"):
        raise ValueError(f"bad AML name segment {name!r}")
    return name.ljust(4, "_").encode("ascii")


def aml_name_string(path: str) -> bytes:
    r"""A NameString: an optional root prefix (\) and one or more dot-separated segments."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    segments = [aml_name_seg(segment) for segment in path.split(".")]
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def aml_integer(value: int) -> bytes:
    """The shortest encoding of an integer: ZeroOp, OneOp, OnesOp or a sized constant."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if 0 <= value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"{value} does not fit an AML integer")


def aml_string(text: str) -> bytes:
    """A string constant: ASCII, NUL-terminated."""
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def aml_eisa_id(text: str) -> bytes:
    """EisaId("PNP0A08"): three letters of 5 bits each and four hex digits, as a DWord.

    The 32-bit value is stored byte-swapped (the compressed ID reads big-endian in memory),
    so PNP0A03 is the integer 0x030AD041.
    """
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA ID {text!r}")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(text[3:], 16)
    return aml_integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


def aml_buffer(data: bytes) -> bytes:
    """Buffer (n) {bytes}: BufferOp, PkgLength, the size as an integer, the bytes."""
    body = aml_integer(len(data)) + data
    return bytes([BUFFER_OP]) + aml_pkg_length(len(body)) + body


def aml_package(*elements: bytes) -> bytes:
    """Package (n) {elements}: PackageOp, PkgLength, the element count (a byte), the elements."""
    if len(elements) > 0xFF:
        raise ValueError("a Package holds at most 255 elements (VarPackage is not needed here)")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + aml_pkg_length(len(body)) + body


def aml_name(name: str, value: bytes) -> bytes:
    """Name (NAME, value): bind a name to a data object."""
    return bytes([NAME_OP]) + aml_name_string(name) + value


def aml_scope(path: str, *terms: bytes) -> bytes:
    """Scope (path) {terms}: open an existing namespace node and add terms to it."""
    body = aml_name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + aml_pkg_length(len(body)) + body


def aml_device(name: str, *terms: bytes) -> bytes:
    """Device (NAME) {terms}: ExtOpPrefix DeviceOp, PkgLength, the name, the terms."""
    body = aml_name_string(name) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + aml_pkg_length(len(body)) + body


# ---- resource descriptors (ACPI 6.5, 6.4), for _CRS buffers -----------------------------
RESOURCE_MEMORY, RESOURCE_IO, RESOURCE_BUS_NUMBER = 0, 1, 2
#: General flags of an address space descriptor: a producer (a bridge's window) with a
#: fixed minimum and maximum, positively decoded.
ADDRESS_PRODUCER_FIXED = 0b1100
MEMORY_READ_WRITE_NON_CACHEABLE = 0b0001
IO_ENTIRE_RANGE = 0b11


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {descriptors}: a Buffer of descriptors and the end tag.

    The end tag's checksum byte is 0, which the spec defines as "treat as summed".
    """
    return aml_buffer(b"".join(descriptors) + bytes([0x79, 0x00]))


def resource_io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """IO (Decode16, min, max, alignment, length): a small descriptor, tag 0x47."""
    return struct.pack("<BBHHBB", 0x47, 0x01, minimum, maximum, alignment, length)


def resource_memory32_fixed(base: int, length: int) -> bytes:
    """Memory32Fixed (ReadWrite, base, length): a large descriptor, tag 0x86."""
    return struct.pack("<BHBII", 0x86, 9, 0x01, base, length)


def resource_word_address(kind: int, type_flags: int, minimum: int, maximum: int) -> bytes:
    """WordBusNumber / WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode): tag 0x88."""
    return struct.pack(
        "<BHBBBHHHHH", 0x88, 13, kind, ADDRESS_PRODUCER_FIXED, type_flags,
        0, minimum, maximum, 0, maximum - minimum + 1,
    )  # fmt: skip


def resource_dword_memory(minimum: int, maximum: int) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    ReadWrite, ...): tag 0x87."""
    return struct.pack(
        "<BHBBBIIIII", 0x87, 23, RESOURCE_MEMORY, ADDRESS_PRODUCER_FIXED,
        MEMORY_READ_WRITE_NON_CACHEABLE, 0, minimum, maximum, 0, maximum - minimum + 1,
    )  # fmt: skip


def resource_qword_memory(minimum: int, maximum: int) -> bytes:
    """QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    ReadWrite, ...): tag 0x8A."""
    return struct.pack(
        "<BHBBBQQQQQ", 0x8A, 43, RESOURCE_MEMORY, ADDRESS_PRODUCER_FIXED,
        MEMORY_READ_WRITE_NON_CACHEABLE, 0, minimum, maximum, 0, maximum - minimum + 1,
    )  # fmt: skip


# ---- the tables ------------------------------------------------------------------------
def build_dsdt(cpus: int, ram_top: int = 0) -> bytes:
    """The DSDT: processors, the PCI root bridge and its resources, and \\_S5."""
    bus_count = ECAM_SIZE >> 20
    high_base, high_end = high_window(ram_top)  # where 64-bit BARs go above RAM
    # ASL:  Device (CXXX) { Name (_HID, "ACPI0007")  Name (_UID, index) }
    # One per vCPU: the namespace object an OS matches to the MADT entry by UID.
    processors = [
        aml_device(f"C{index:03X}", aml_name("_HID", aml_string("ACPI0007")),
                   aml_name("_UID", aml_integer(index)))
        for index in range(cpus)
    ]  # fmt: skip
    # ASL:  Name (_CRS, ResourceTemplate () {
    #           WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
    #                          0, 0x00, 0xFF, 0, 0x100)
    #           IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)
    #           WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
    #                   0, 0xC000, 0xFFFF, 0, 0x4000)
    #           DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed,
    #                        NonCacheable, ReadWrite, 0, 0xC0000000, 0xCFFFFFFF, 0, 0x10000000)
    #           QWordMemory (..., high_base, high_end - 1, ...) })
    # The configuration ports are the bridge's own (consumed, hence plain IO); the others
    # are the windows devices behind it decode.
    crs = resource_template(
        resource_word_address(RESOURCE_BUS_NUMBER, 0, 0, bus_count - 1),
        resource_io(0xCF8, 0xCF8, 1, 8),
        resource_word_address(RESOURCE_IO, IO_ENTIRE_RANGE, IO_WINDOW[0], IO_WINDOW[1] - 1),
        resource_dword_memory(MEMORY_WINDOW[0], MEMORY_WINDOW[1] - 1),
        resource_qword_memory(high_base, high_end - 1),
    )
    # ASL:  Name (_PRT, Package () { Package () { 0xSSSSFFFF, pin, Zero, irq }, ... })
    # Every slot's INTA-INTD, hard-wired (source Zero) to the GSI of its link's IRQ: GSIs 0-15
    # are the ISA IRQs, so the same number the interrupt line register holds.
    prt = aml_package(
        *(
            aml_package(aml_integer(slot << 16 | 0xFFFF), aml_integer(pin - 1),
                        aml_integer(0), aml_integer(intx_irq(slot, pin)))
            for slot in range(1, SLOTS)
            for pin in range(1, 5)
        )
    )  # fmt: skip
    # ASL:  Device (PCI0) { Name (_HID, EisaId ("PNP0A08"))  Name (_CID, EisaId ("PNP0A03"))
    #                       Name (_SEG, Zero)  Name (_BBN, Zero)  Name (_UID, Zero)
    #                       Name (_CRS, ...)  Name (_PRT, ...) }
    pci0 = aml_device(
        "PCI0",
        aml_name("_HID", aml_eisa_id("PNP0A08")),  # PCI Express root bridge
        aml_name("_CID", aml_eisa_id("PNP0A03")),  # compatible: PCI root bridge
        aml_name("_SEG", aml_integer(0)),
        aml_name("_BBN", aml_integer(0)),
        aml_name("_UID", aml_integer(0)),
        aml_name("_CRS", crs),
        aml_name("_PRT", prt),
    )
    # ASL:  Device (ECAM) { Name (_HID, EisaId ("PNP0C02"))  Name (_UID, One)
    #           Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xE0000000,
    #                                                            0x10000000) }) }
    # Motherboard resources: Linux uses the MCFG area only where ACPI or the e820 map
    # reserves it, and this way it does not depend on the e820 map.
    ecam = aml_device(
        "ECAM",
        aml_name("_HID", aml_eisa_id("PNP0C02")),
        aml_name("_UID", aml_integer(1)),
        aml_name("_CRS", resource_template(resource_memory32_fixed(ECAM_BASE, ECAM_SIZE))),
    )
    # ASL:  Scope (\_SB) { processors, PCI0, ECAM }
    #       Name (\_S5, Package (0x04) { SLP_TYPa, SLP_TYPb, Zero, Zero })
    aml = aml_scope("\\_SB", *processors, pci0, ecam) + aml_name(
        "\\_S5", aml_package(*(aml_integer(v) for v in (S5_SLEEP_TYPE, S5_SLEEP_TYPE, 0, 0)))
    )
    return sdt(b"DSDT", DSDT_REVISION, aml)


def build_facs() -> bytes:
    """The FACS (version 2): signature, length, and zeros (no waking vector, no lock)."""
    facs = bytearray(64)
    struct.pack_into("<4sI", facs, 0, b"FACS", len(facs))
    facs[32] = 2  # version
    return bytes(facs)


def build_fadt(cpus: int, facs_address: int, dsdt_address: int) -> bytes:
    """The FADT ("FACP"), revision 6.0: fixed hardware, SCI, sleep control and reset."""
    flags = (
        FADT_WBINVD
        | FADT_PROC_C1
        | FADT_PWR_BUTTON
        | FADT_SLP_BUTTON
        | FADT_RTC_S4
        | FADT_RESET_REG_SUP
    )
    # QEMU's rule: flat logical APIC destination mode reaches only 8 CPUs.
    if cpus > 8:
        flags |= FADT_FORCE_APIC_CLUSTER_MODEL
    # QEMU also sets USE_PLATFORM_CLOCK; pyvmm has no PM timer or HPET to use instead.
    fadt = bytearray(FADT_LENGTH)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into("<" + fmt, fadt, offset, *values)

    # Offsets as in ACPI 6.5 table 5.9, from the start of the table.
    put(36, "II", facs_address, dsdt_address)  # FIRMWARE_CTRL, DSDT (32-bit)
    put(44, "B", 1)  # ACPI 1.0's INT_MODEL, "dual PIC + APIC", as QEMU keeps it
    put(46, "H", SCI_IRQ)  # SCI_INT; SMI_CMD and its enable/disable values stay 0
    put(56, "I", PM1A_EVENT_PORT)  # PM1a_EVT_BLK
    put(64, "I", PM1A_CONTROL_PORT)  # PM1a_CNT_BLK
    put(88, "BB", 4, 2)  # PM1_EVT_LEN, PM1_CNT_LEN; PM2, PM timer and GPE blocks: none
    put(96, "HH", 0xFFF, 0xFFF)  # P_LVL2_LAT, P_LVL3_LAT: above the limits, no C2/C3
    put(108, "B", RTC_CENTURY_INDEX)  # CENTURY
    put(109, "H", BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT)  # no 8042, no VGA
    put(112, "I", flags)
    fadt[116:128] = gas_io(RESET_PORT, 1, ACCESS_BYTE)  # RESET_REG
    put(128, "B", RESET_VALUE)
    put(131, "B", FADT_MINOR_REVISION)
    put(132, "QQ", facs_address, dsdt_address)  # X_FIRMWARE_CTRL, X_DSDT
    fadt[148:160] = gas_io(PM1A_EVENT_PORT, 4)  # X_PM1a_EVT_BLK
    fadt[172:184] = gas_io(PM1A_CONTROL_PORT, 2)  # X_PM1a_CNT_BLK
    # SLEEP_CONTROL_REG and SLEEP_STATUS_REG (244, 256) are for hardware-reduced ACPI only;
    # the hypervisor vendor identity (268) stays 0. (ACPI 5.0's 268-byte FADT would do,
    # but iasl -d up to at least 2020 misreads one that long.)
    return sdt(b"FACP", FADT_REVISION, fadt[SDT_HEADER.size :])


def build_madt(cpus: int) -> bytes:
    """The MADT ("APIC"): local APICs, the IOAPIC, interrupt overrides, LINT1 NMI."""
    body = bytearray(struct.pack("<II", LOCAL_APIC_ADDRESS, MADT_PCAT_COMPAT))
    for index in range(cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, index, index, MADT_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_ADDRESS, 0)
    # ISA bus (0), source IRQ, GSI, MPS INTI flags.
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, 2, MPS_INTI_CONFORMS)
    # The IRQs PCI interrupts and the SCI use, level-triggered active-high, as QEMU
    # declares them (the SCI, IRQ 9, is one of them).
    for irq in PCI_IRQS:
        body += struct.pack(
            "<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, irq, irq, MPS_INTI_ACTIVE_HIGH_LEVEL
        )
    # All processors (UID 0xFF), flags conforming, LINT1.
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, MPS_INTI_CONFORMS, 1)
    return sdt(b"APIC", MADT_REVISION, body)


def build_mcfg() -> bytes:
    """The MCFG: one ECAM allocation, segment 0, the buses pci/host.py decodes."""
    last_bus = (ECAM_SIZE >> 20) - 1
    body = bytes(8) + struct.pack("<QHBBI", ECAM_BASE, 0, 0, last_bus, 0)
    return sdt(b"MCFG", 1, body)


def build_rsdp(rsdt_address: int, xsdt_address: int) -> bytes:
    """The RSDP, revision 2: a checksum over the first 20 bytes, another over all 36."""
    rsdp = bytearray(
        struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt_address, 36, xsdt_address, 0)
    )
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    return bytes(rsdp)


@dataclass(frozen=True)
class AcpiTables:
    """The tables and where each goes: {signature: (guest-physical address, bytes)}.

    Keys are the signatures ("RSDP" for the root pointer, "FACP" for the FADT, "APIC" for
    the MADT).
    """

    rsdp_address: int
    tables: dict[str, tuple[int, bytes]]


def build_acpi_tables(cpus: int, ram_top: int = 0) -> AcpiTables:
    """Build every table for a machine with cpus vCPUs and RAM up to ram_top (for the
    64-bit PCI window); no guest memory needed."""
    if not 1 <= cpus <= 0xFF:
        raise ConfigurationError(f"ACPI tables describe 1 to 255 vCPUs, not {cpus}")
    tables: dict[str, tuple[int, bytes]] = {"FACS": (FACS_ADDRESS, build_facs())}
    next_free = ACPI_TABLES_START

    def place(signature: str, data: bytes) -> int:
        nonlocal next_free
        address = next_free
        tables[signature] = (address, data)
        next_free = _align(address + len(data), 16)
        return address

    dsdt = place("DSDT", build_dsdt(cpus, ram_top))
    fadt = place("FACP", build_fadt(cpus, FACS_ADDRESS, dsdt))
    madt = place("APIC", build_madt(cpus))
    mcfg = place("MCFG", build_mcfg())
    listed = (fadt, madt, mcfg)
    rsdt = place("RSDT", sdt(b"RSDT", 1, struct.pack(f"<{len(listed)}I", *listed)))
    xsdt = place("XSDT", sdt(b"XSDT", 1, struct.pack(f"<{len(listed)}Q", *listed)))
    if next_free > ACPI_AREA_END:
        raise ConfigurationError(
            f"the ACPI tables end at {next_free:#x}, past {ACPI_AREA_END:#x} (the MP table's)"
        )
    tables["RSDP"] = (RSDP_ADDRESS, build_rsdp(rsdt, xsdt))
    return AcpiTables(RSDP_ADDRESS, tables)


def write_acpi_tables(memory: GuestMemory, cpus: int) -> int:
    """Write the ACPI tables into guest RAM (0xE0000-0xEFFFF); returns the RSDP's address."""
    if not memory.contains(RSDP_ADDRESS, ACPI_AREA_END - RSDP_ADDRESS):
        raise ConfigurationError("the ACPI tables need guest RAM at 0xE0000-0xEFFFF")
    built = build_acpi_tables(cpus, memory.top)
    memory.fill(RSDP_ADDRESS, ACPI_AREA_END - RSDP_ADDRESS)
    for address, data in built.tables.values():
        memory.write(address, data)
    return built.rsdp_address


# ---- the PM1a event block the FADT declares ---------------------------------------------
class Pm1EventBlock:
    """PM1a_STS (port 0x600) and PM1a_EN (0x602), the event block the FADT must declare.

    Nothing raises an ACPI fixed event in pyvmm (no power button, no PM timer, no RTC
    alarm), so the status register always reads 0 (its bits are write-1-to-clear: writes
    change nothing); the enable register keeps what the OS writes. Served in Python: an OS
    touches it a few times at start-up and in the SCI handler, which never runs.
    """

    def __init__(self) -> None:
        self.enable = 0

    def __call__(self, offset: int, data: memoryview, is_write: bool) -> None:
        """Serve an access of any width at offset 0-3 of the block."""
        registers = bytearray((0).to_bytes(2, "little") + self.enable.to_bytes(2, "little"))
        end = min(offset + len(data), 4)
        if is_write:
            registers[offset:end] = data[: end - offset]
            self.enable = int.from_bytes(registers[2:4], "little")
        else:
            data[:] = bytes(registers[offset:end]).ljust(len(data), b"\xff")


def add_pm1_event_block(pio: Bus, port: int = PM1A_EVENT_PORT) -> Pm1EventBlock:
    """Claim the PM1a event block (4 ports) on a port I/O bus."""
    block = Pm1EventBlock()
    pio.add(port, 4, block, "acpi-pm1a-event")
    return block
