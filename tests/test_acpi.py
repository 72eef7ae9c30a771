"""ACPI tables and the MP table: parsed here from the spec's offsets, decompiled by iasl, and
found by a guest on the real /dev/kvm."""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pyvmm import acpi
from pyvmm.acpi import (
    Pm1EventBlock,
    aml_eisa_id,
    aml_integer,
    aml_name_string,
    aml_pkg_length,
    build_acpi_tables,
    write_acpi_tables,
)
from pyvmm.devices.power import PM1A_CONTROL_PORT, RESET_CONTROL_PORT
from pyvmm.errors import ConfigurationError
from pyvmm.memory import GIB, MIB, GuestMemory
from pyvmm.mptable import build_mp_table, write_mp_table
from pyvmm.pci.config import intx_irq
from pyvmm.pci.host import ECAM_BASE, ECAM_SIZE

CPU_COUNTS = [1, 2, 4, 9, 64]
SDT_SIGNATURES = {"DSDT", "FACP", "APIC", "MCFG", "RSDT", "XSDT"}


def u8(data: bytes, offset: int) -> int:
    return data[offset]


def u16(data: bytes, offset: int) -> int:
    return struct.unpack_from("<H", data, offset)[0]


def u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


def gas(data: bytes, offset: int) -> tuple[int, int, int, int, int]:
    """(space ID, bit width, bit offset, access size, address) of a Generic Address."""
    return struct.unpack_from("<BBBBQ", data, offset)


def madt_entries(madt: bytes) -> list[bytes]:
    entries, offset = [], 44
    while offset < len(madt):
        length = madt[offset + 1]
        assert length >= 2
        entries.append(madt[offset : offset + length])
        offset += length
    assert offset == len(madt)
    return entries


# ---- the ACPI tables, parsed here --------------------------------------------------------
@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_layout_in_the_bios_area(cpus):
    tables = build_acpi_tables(cpus, 4 * GIB).tables
    assert tables["RSDP"][0] == 0xE0000
    assert tables["FACS"][0] % 64 == 0  # the spec's alignment for the FACS
    spans = sorted((address, address + len(data)) for address, data in tables.values())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start  # no two overlap
    assert all(start % 16 == 0 for start, _ in spans)
    assert spans[0][0] >= 0xE0000 and spans[-1][1] <= 0xF0000  # the MP table has 0xF0000 up


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_every_table_checks_out(cpus):
    built = build_acpi_tables(cpus, 4 * GIB)
    for signature, (_, data) in built.tables.items():
        if signature in SDT_SIGNATURES:
            assert data[:4] == signature.encode()
            assert u32(data, 4) == len(data)
            assert sum(data) % 256 == 0, signature
            assert data[10:16] == b"PYVMM "


def test_rsdp():
    built = build_acpi_tables(2)
    address, rsdp = built.tables["RSDP"]
    assert built.rsdp_address == address == 0xE0000
    assert len(rsdp) == 36 and rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0  # the ACPI 1.0 checksum
    assert sum(rsdp) % 256 == 0  # the extended checksum
    assert rsdp[15] == 2  # revision: ACPI 2.0+, with the XSDT
    assert u32(rsdp, 20) == 36
    assert u32(rsdp, 16) == built.tables["RSDT"][0]
    assert u64(rsdp, 24) == built.tables["XSDT"][0]


def test_root_tables_list_fadt_madt_mcfg():
    tables = build_acpi_tables(4).tables
    want = [tables[s][0] for s in ("FACP", "APIC", "MCFG")]
    rsdt, xsdt = tables["RSDT"][1], tables["XSDT"][1]
    assert [u32(rsdt, o) for o in range(36, len(rsdt), 4)] == want
    assert [u64(xsdt, o) for o in range(36, len(xsdt), 8)] == want


@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_madt(cpus):
    madt = build_acpi_tables(cpus).tables["APIC"][1]
    assert u32(madt, 36) == 0xFEE00000  # local APIC address
    assert u32(madt, 40) == 1  # PCAT_COMPAT: the 8259s are there
    entries = madt_entries(madt)
    local = [e for e in entries if e[0] == 0]
    assert [(e[2], e[3], u32(e, 4)) for e in local] == [(i, i, 1) for i in range(cpus)]
    (ioapic,) = [e for e in entries if e[0] == 1]
    assert (ioapic[2], u32(ioapic, 4), u32(ioapic, 8)) == (0, 0xFEC00000, 0)
    overrides = [(e[2], e[3], u32(e, 4), u16(e, 8)) for e in entries if e[0] == 2]
    # IRQ 0 -> GSI 2 conforming; PCI's IRQs and the SCI (9) active-high, level-triggered.
    assert overrides == [(0, 0, 2, 0)] + [(0, irq, irq, 0xD) for irq in (5, 9, 10, 11)]
    (nmi,) = [e for e in entries if e[0] == 4]
    assert (nmi[2], u16(nmi, 3), nmi[5]) == (0xFF, 0, 1)  # all processors, LINT1
    # Processors first, as the spec asks of the MADT's order.
    assert [e[0] for e in entries] == [0] * cpus + [1] + [2] * 5 + [4]


@pytest.mark.parametrize("cpus", [1, 8, 9])
def test_fadt(cpus):
    tables = build_acpi_tables(cpus).tables
    fadt = tables["FACP"][1]
    assert (len(fadt), fadt[8], fadt[131]) == (276, 6, 0)  # ACPI 6.0
    assert u32(fadt, 36) == u64(fadt, 132) == tables["FACS"][0]
    assert u32(fadt, 40) == u64(fadt, 140) == tables["DSDT"][0]
    assert u16(fadt, 46) == 9  # SCI
    assert u32(fadt, 48) == 0  # no SMI command port: always in ACPI mode
    assert (u32(fadt, 56), fadt[88]) == (0x600, 4)  # PM1a event block
    assert (u32(fadt, 64), fadt[89]) == (PM1A_CONTROL_PORT, 2)  # PM1a control: power.py's
    assert (u32(fadt, 76), fadt[91]) == (0, 0)  # no PM timer
    assert fadt[108] == 0x32  # RTC century index
    assert u16(fadt, 109) == 0b101  # legacy devices, no 8042, VGA not present
    flags = u32(fadt, 112)
    assert flags & (1 << 10)  # RESET_REG_SUP
    assert not flags & (1 << 20)  # not HW_REDUCED_ACPI
    assert bool(flags & (1 << 18)) == (cpus > 8)  # cluster mode above 8 CPUs, as QEMU
    assert gas(fadt, 116) == (1, 8, 0, 1, RESET_CONTROL_PORT)  # reset register: I/O 0xCF9
    assert fadt[128] == 0x06
    assert gas(fadt, 148) == (1, 32, 0, 0, 0x600)  # X_PM1a_EVT_BLK
    assert gas(fadt, 172) == (1, 16, 0, 0, PM1A_CONTROL_PORT)  # X_PM1a_CNT_BLK


def test_facs():
    address, facs = build_acpi_tables(1).tables["FACS"]
    assert (facs[:4], u32(facs, 4), facs[32]) == (b"FACS", 64, 2)
    assert address % 64 == 0


def test_mcfg_matches_the_ecam():
    mcfg = build_acpi_tables(1).tables["MCFG"][1]
    assert len(mcfg) == 60  # one allocation
    base, segment, start, end = struct.unpack_from("<QHBB", mcfg, 44)
    assert (base, segment, start, end) == (ECAM_BASE, 0, 0, (ECAM_SIZE >> 20) - 1)


def test_dsdt_names_and_s5():
    dsdt = build_acpi_tables(4).tables["DSDT"][1]
    assert dsdt[8] == 2  # 64-bit AML integers
    for name in (b"PCI0", b"_HID", b"_CID", b"_SEG", b"_BBN", b"_UID", b"_CRS", b"_PRT"):
        assert name in dsdt
    assert aml_eisa_id("PNP0A08") in dsdt and aml_eisa_id("PNP0A03") in dsdt
    # Name (\_S5, Package (4) {Zero, Zero, Zero, Zero}): SLP_TYPa 0, OS writes 0x2000.
    assert b"\x08\\_S5_\x12\x06\x04\x00\x00\x00\x00" in dsdt
    assert b"C003" in dsdt and b"C004" not in dsdt


def qword_window(dsdt: bytes) -> tuple[int, int]:
    at = dsdt.index(b"\x8a\x2b\x00")  # QWordMemory: tag, length 43
    return u64(dsdt, at + 14), u64(dsdt, at + 22)


@pytest.mark.parametrize(
    ("ram_top", "base"), [(64 * MIB, 4 * GIB), (6 * GIB, 6 * GIB), (6 * GIB + 1, 7 * GIB)]
)
def test_high_pci_window_starts_where_64_bit_bars_go(ram_top, base):
    low, high = qword_window(build_acpi_tables(1, ram_top).tables["DSDT"][1])
    assert (low, high) == (base, base + 32 * GIB - 1)


def test_aml_encodings():
    assert aml_pkg_length(0) == b"\x01"
    assert aml_pkg_length(62) == b"\x3f"  # the largest one-byte length
    assert aml_pkg_length(63) == bytes([0x40 | (65 & 0xF), 65 >> 4])
    assert aml_pkg_length(0xFFD) == bytes([0x40 | 0xF, 0xFF])  # 0xFFF: two bytes' limit
    assert aml_pkg_length(0xFFE) == bytes([0x80 | 1, 0x00, 0x01])  # 0x1001 in three
    assert [aml_integer(v) for v in (0, 1, 2, 0x100, 0x10000, 1 << 32, (1 << 64) - 1)] == [
        b"\x00", b"\x01", b"\x0a\x02", b"\x0b\x00\x01", b"\x0c\x00\x00\x01\x00",
        b"\x0e" + (1 << 32).to_bytes(8, "little"), b"\xff",
    ]  # fmt: skip
    assert aml_eisa_id("PNP0A03") == b"\x0c" + (0x030AD041).to_bytes(4, "little")
    assert aml_name_string("_S5") == b"_S5_"
    assert aml_name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml_name_string("\\_SB.PCI0.ECAM") == b"\\\x2f\x03_SB_PCI0ECAM"


def test_too_many_cpus():
    with pytest.raises(ConfigurationError):
        build_acpi_tables(256)


def test_write_acpi_tables():
    memory = GuestMemory("2M")
    try:
        memory.fill(0xE0000, 0x10000, 0xEE)  # stale bytes are cleared
        assert write_acpi_tables(memory, 2) == 0xE0000
        built = build_acpi_tables(2, memory.top)
        for address, data in built.tables.values():
            assert memory.read(address, len(data)) == data
        assert memory.read(0xE0024, 0x1C) == bytes(0x1C)
    finally:
        memory.close()


def test_pm1_event_block():
    block = Pm1EventBlock()
    status = bytearray(b"\xff\xff")
    block(0, memoryview(status), False)
    assert status == b"\x00\x00"
    block(2, memoryview(bytearray(b"\x21\x01")), True)  # PWRBTN_EN | GBL_EN, say
    whole = bytearray(4)
    block(0, memoryview(whole), False)
    assert whole == b"\x00\x00\x21\x01"
    block(0, memoryview(bytearray(b"\xff\xff")), True)  # write-1-to-clear: nothing to clear
    assert block.enable == 0x121


# ---- the MP table, parsed here -----------------------------------------------------------
@pytest.mark.parametrize("cpus", CPU_COUNTS)
def test_mp_table(cpus):
    floating, table = build_mp_table(cpus, cpu_signature=0x806F8, cpu_features=0x178BFBFF)
    assert floating[:4] == b"_MP_" and len(floating) == 16 and sum(floating) % 256 == 0
    assert (u32(floating, 4), floating[8], floating[9], floating[11], floating[12]) == (
        0xF0010, 1, 4, 0, 0,
    )  # fmt: skip
    assert table[:4] == b"PCMP" and u16(table, 4) == len(table) and sum(table) % 256 == 0
    assert table[6] == 4 and u32(table, 36) == 0xFEE00000
    count, offset, entries = u16(table, 34), 44, []
    for _ in range(count):
        length = 20 if table[offset] == 0 else 8
        entries.append(table[offset : offset + length])
        offset += length
    assert offset == len(table)
    types = [e[0] for e in entries]
    assert types == sorted(types)  # the spec's order: processors, buses, IOAPICs, ...
    processors = [(e[1], e[2], e[3], u32(e, 4), u32(e, 8)) for e in entries if e[0] == 0]
    assert processors == [
        (i, 0x14, 1 | (2 if i == 0 else 0), 0x806F8, 0x178BFBFF) for i in range(cpus)
    ]
    assert [(e[1], e[2:8]) for e in entries if e[0] == 1] == [(0, b"PCI   "), (1, b"ISA   ")]
    assert [(e[1], e[2], e[3], u32(e, 4)) for e in entries if e[0] == 2] == [
        (0, 0x11, 1, 0xFEC00000)
    ]
    io = [(e[1], u16(e, 2), e[4], e[5], e[6], e[7]) for e in entries if e[0] == 3]
    isa = [(irq, flags, pin) for kind, flags, bus, irq, apic, pin in io if bus == 1]
    want_isa = [(0, 0, 2)] + [
        (i, 0xD if i == 9 else 0, i) for i in range(3, 16) if i not in (5, 10, 11)
    ]
    assert isa == [want_isa[0], (1, 0, 1), *want_isa[1:]]
    pci = [(irq, flags, pin) for kind, flags, bus, irq, apic, pin in io if bus == 0]
    assert pci == [
        (slot << 2 | (p - 1), 1, intx_irq(slot, p)) for slot in range(1, 32) for p in range(1, 5)
    ]
    assert all(kind == 0 and apic == 0 for kind, _, _, _, apic, _ in io)
    local = [(e[1], e[4], e[5], e[6], e[7]) for e in entries if e[0] == 4]
    assert local == [(3, 1, 0, 0, 0), (1, 1, 0, 0xFF, 1)]  # ExtINT on LINT0, NMI on LINT1


def test_write_mp_table_clear_of_the_acpi_tables():
    memory = GuestMemory("1M")
    try:
        write_acpi_tables(memory, 64)
        acpi_bytes = memory.read(0xE0000, 0x10000)
        assert write_mp_table(memory, 64) == 0xF0000
        floating, table = build_mp_table(64)
        assert memory.read(0xF0000, 16) == floating
        assert memory.read(0xF0010, len(table)) == table
        assert memory.read(0xE0000, 0x10000) == acpi_bytes
    finally:
        memory.close()


# ---- iasl: the tables as ACPICA reads them -------------------------------------------------
IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(
    IASL is None, reason="iasl not installed (apt-get install acpica-tools)"
)
#: What iasl prints about a table it cannot fully make sense of.
IASL_COMPLAINTS = re.compile(
    r"error|warning|invalid|terminates in the middle|unknown|mismatch", re.IGNORECASE
)


def flat(text: str) -> str:
    """iasl's dump with runs of whitespace made single spaces."""
    return re.sub(r"[ \t]+", " ", text)


@pytest.fixture(scope="module")
def disassembled(tmp_path_factory) -> dict[str, str]:
    """iasl -d of every table but the RSDP (iasl cannot take one alone) for 4 vCPUs."""
    if IASL is None:
        pytest.skip("iasl not installed (apt-get install acpica-tools)")
    where = tmp_path_factory.mktemp("acpi")
    texts = {}
    for signature, (_, data) in build_acpi_tables(4, 6 * GIB).tables.items():
        if signature == "RSDP":
            continue
        path = where / f"{signature.lower()}.dat"
        path.write_bytes(data)
        done = subprocess.run(
            [IASL, "-d", path.name], cwd=where, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        texts[signature] = (where / f"{signature.lower()}.dsl").read_text()
    texts["_dir"] = str(where)
    return texts


@needs_iasl
def test_iasl_decompiles_every_table_without_complaint(disassembled):
    for signature, text in disassembled.items():
        if signature == "_dir":
            continue
        # The banner and table header are a comment block; complaints are in the body.
        for line in text.splitlines():
            if "Compiler" in line or "Disassembler" in line:
                continue
            assert not IASL_COMPLAINTS.search(line), f"{signature}: {line}"


@needs_iasl
def test_iasl_madt(disassembled):
    text = flat(disassembled["APIC"])
    assert text.count("Subtable Type : 00 [Processor Local APIC]") == 4
    assert text.count("Processor Enabled : 1") == 4
    assert "Local Apic Address : FEE00000" in text
    assert "PC-AT Compatibility : 1" in text
    assert "Subtable Type : 01 [I/O APIC]" in text and "Address : FEC00000" in text
    assert text.count("[Interrupt Source Override]") == 5
    assert "Subtable Type : 04 [Local APIC NMI]" in text
    assert "Interrupt Input LINT : 01" in text


@needs_iasl
def test_iasl_fadt(disassembled):
    text = flat(disassembled["FACP"])
    for line in (
        "Revision : 06",
        "SCI Interrupt : 0009",
        "PM1A Event Block Address : 00000600",
        "PM1A Control Block Address : 00000604",
        "PM1 Control Block Length : 02",
        "RTC Century Index : 32",
        "Reset Register Supported (V2) : 1",
        "Hardware Reduced (V5) : 0",
        "Value to cause reset : 06",
        "Address : 0000000000000CF9",
        "Address : 0000000000000604",
    ):
        assert line in text, line


@needs_iasl
def test_iasl_mcfg_and_roots(disassembled):
    mcfg = flat(disassembled["MCFG"])
    assert "Base Address : 00000000E0000000" in mcfg
    assert "Start Bus Number : 00" in mcfg and "End Bus Number : FF" in mcfg
    assert flat(disassembled["XSDT"]).count("ACPI Table Address") == 3
    assert flat(disassembled["RSDT"]).count("ACPI Table Address") == 3
    assert '"FACS"' in disassembled["FACS"]


@needs_iasl
def test_iasl_dsdt(disassembled):
    text = flat(disassembled["DSDT"])
    for line in (
        "Device (PCI0)",
        'Name (_HID, EisaId ("PNP0A08")',
        'Name (_CID, EisaId ("PNP0A03")',
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
        "0xC000, // Range Minimum",
        "0xC0000000, // Range Minimum",
        "0xCFFFFFFF, // Range Maximum",
        "0x0000000180000000, // Range Minimum",
        "IO (Decode16,",
        "0x0CF8, // Range Minimum",
        "Name (_PRT, Package (0x7C)",
        'Name (_HID, EisaId ("PNP0C02")',
        "0xE0000000, // Address Base",
        "Device (C003)",
        "Name (\\_S5, Package (0x04)",
    ):
        assert line in text, line
    assert "Device (C004)" not in text


@needs_iasl
def test_iasl_recompiles_the_dsdt(disassembled):
    where = Path(disassembled["_dir"])
    done = subprocess.run(
        [IASL, "-p", "recompiled", "dsdt.dsl"], cwd=where, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 Errors, 0 Warnings, 0 Remarks" in done.stdout


ACPIEXEC = shutil.which("acpiexec")


@pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec not installed (acpica-tools)")
def test_acpiexec_loads_and_evaluates(tmp_path):
    """ACPICA's interpreter (as in Linux) loads the DSDT and evaluates \\_S5, _CRS, _PRT."""
    files = []
    for signature in ("FACP", "DSDT", "APIC", "MCFG"):
        path = tmp_path / f"{signature.lower()}.dat"
        path.write_bytes(build_acpi_tables(2).tables[signature][1])
        files.append(path.name)
    commands = "evaluate \\_S5; evaluate \\_SB.PCI0._CRS; evaluate \\_SB.PCI0._PRT"
    done = subprocess.run(
        [ACPIEXEC, "-b", commands, *files], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 ACPI AML tables successfully acquired and loaded" in out
    assert "ACPI Error" not in out and "ACPI Warning" not in out and "AE_AML" not in out
    assert "[Package] Contains 4 Elements:" in out  # \_S5
    assert "[Package] Contains 124 Elements:" in out  # _PRT: 31 slots x 4 pins
    assert "88 0D 00 02 0C 00 00 00 00 00 FF 00" in out  # _CRS: bus numbers 0-255


# ---- the platform guest on /dev/kvm ---------------------------------------------------------
def attach_platform(machine) -> None:
    """The tables a PC-style boot gets (every machine has the CMOS already)."""
    write_acpi_tables(machine.memory, machine.cpus)
    write_mp_table(machine.memory, machine.cpus)


def field(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return match.groups()


@pytest.mark.parametrize(("cpus", "memory", "mib"), [(1, "64M", 64), (4, "64M", 64),
                                                     (1, "5G", 5120), (4, "5G", 5120)])  # fmt: skip
def test_platform_guest(run_guest, cpus, memory, mib):
    result = run_guest("platform", cpus=cpus, memory=memory, timeout=60, setup=attach_platform)
    text = result.serial_text
    assert (result.outcome, result.exit_status) == ("exit", 0), text + result.message
    assert "FAIL" not in text
    assert result.unclaimed_pio.count == 0
    cmos_cpus, ram_mib = field(r"cmos: .*, cpus (\d+), ram (\d+) MiB", text)
    assert (int(cmos_cpus), int(ram_mib)) == (cpus, mib)
    assert "cmos: ram byte kept" in text
    stamp = field(r"rtc: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)[0]
    seen = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - seen).total_seconds()) < 120
    assert field(r"acpi: RSDP at (0x\w+), revision (\d)", text) == ("0xe0000", "2")
    assert "acpi: XSDT lists FACP APIC MCFG" in text
    madt = r"MADT: local APIC (0x\w+), (\d+) enabled CPUs, IOAPIC (\d+) at (0x\w+)"
    assert field(madt, text) == ("0xfee00000", str(cpus), "0", "0xfec00000")
    assert field(r"FADT: revision (\d+), SCI (\d+), PM1a control (0x\w+), "
                 r"reset register (0x\w+) = (0x\w+)", text) == (
        "6", "9", "0x604", "0xcf9", "0x06",
    )  # fmt: skip
    assert "FACS ok" in text and "acpi: DSDT: \\_S5 SLP_TYPa 0" in text
    assert "acpi: MCFG: ECAM 0xe0000000, segment 0, buses 0-255" in text
    mptable = r"mptable: at (0x\w+), (\d+) enabled CPUs, BSP APIC (\d+), IOAPIC (\d+)"
    assert field(mptable, text) == ("0xf0000", str(cpus), "0", "0")
    assert text.endswith("platform: powering off through port 0x604\n")


def test_platform_guest_powers_off_where_the_fadt_says(run_guest):
    """Moved PM1a control (in the FADT only): the guest's write misses pyvmm's power-off."""

    def setup(machine) -> None:
        attach_platform(machine)
        address, fadt = build_acpi_tables(1, machine.memory.top).tables["FACP"]
        moved = bytearray(fadt)
        struct.pack_into("<I", moved, 64, 0x608)
        struct.pack_into("<Q", moved, 176, 0x608)
        moved[9] = 0
        moved[9] = -sum(moved) & 0xFF
        machine.memory.write(address, bytes(moved))

    result = run_guest("platform", setup=setup, timeout=60)
    assert "PM1a control 0x608" in result.serial_text
    assert "FAIL: still running after the FADT's power-off" in result.serial_text
    assert result.exit_status == 15 << 1 | 1  # guest_main returned F_POWER_OFF
    assert result.unclaimed_pio.last_address == 0x608


def test_acpi_module_constants_match_the_devices():
    assert acpi.PM1A_CONTROL_PORT == PM1A_CONTROL_PORT
    assert acpi.RESET_PORT == RESET_CONTROL_PORT
