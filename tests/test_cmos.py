"""The CMOS/RTC: the memory size fields firmware fills, the clock, and CMOS RAM."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.cmos import Cmos, add_cmos, memory_fields, ram_split
from pyvmm.errors import ConfigurationError
from pyvmm.memory import GIB, MIB, GuestMemory

KIB = 1024


def word(fields: dict[int, int], index: int) -> int:
    return fields[index] | fields[index + 1] << 8


def above_4g(fields: dict[int, int]) -> int:
    return fields[0x5B] | fields[0x5C] << 8 | fields[0x5D] << 16


@pytest.mark.parametrize(
    ("below", "above", "base", "extended", "above_16m", "high_units"),
    [
        # 1 MiB: nothing above 1 MiB; base memory is capped at 640 KiB.
        (1 * MIB, 0, 640, 0, 0, 0),
        # 512 KiB of RAM in all (QEMU's rule: base = min(RAM, 640 KiB)).
        (512 * KIB, 0, 512, 0, 0, 0),
        # 16 MiB: 15 MiB extended, nothing above 16 MiB.
        (16 * MIB, 0, 640, 15 * 1024, 0, 0),
        # 64 MiB: extended 63 MiB; 48 MiB above 16 MiB = 768 units of 64 KiB.
        (64 * MIB, 0, 640, 63 * 1024, 768, 0),
        # 65 MiB: the extended field saturates at 0xFFFF KiB.
        (65 * MIB, 0, 640, 0xFFFF, 784, 0),
        # 1 GiB.
        (1 * GIB, 0, 640, 0xFFFF, (1024 - 16) * 16, 0),
        # 5 GiB: 3 GiB below the hole, 2 GiB from 4 GiB up.
        (3 * GIB, 2 * GIB, 640, 0xFFFF, (3072 - 16) * 16, 2 * GIB // (64 * KIB)),
        # 1 TiB above 4 GiB still fits the 24-bit field (2^24 units = 1 TiB is the limit).
        (3 * GIB, 1024 * GIB - 3 * GIB, 640, 0xFFFF, 48896, (1021 * GIB) >> 16),
    ],
)
def test_memory_fields(below, above, base, extended, above_16m, high_units):
    fields = memory_fields(below, above, cpus=1)
    assert word(fields, 0x15) == base
    assert word(fields, 0x17) == extended
    assert word(fields, 0x30) == extended
    assert word(fields, 0x34) == above_16m
    assert above_4g(fields) == high_units
    assert all(0 <= value <= 0xFF for value in fields.values())


def test_above_16m_field_saturates():
    # Only with more than ~4 GiB below the hole could 0x34/0x35 overflow; the rule caps it.
    assert word(memory_fields(8 * GIB, 0, 1), 0x34) == 0xFFFF


@pytest.mark.parametrize("cpus", [1, 2, 4, 64])
def test_cpu_count(cpus):
    assert Cmos(64 * MIB, 0, cpus).read(0x5F) == cpus - 1


@pytest.mark.parametrize(
    ("size", "split"),
    [("64M", (64 * MIB, 0)), ("3G", (3 * GIB, 0)), ("5G", (3 * GIB, 2 * GIB))],
)
def test_ram_split_follows_the_mmio_hole(size, split):
    memory = GuestMemory(size)
    try:
        assert ram_split(memory) == split
    finally:
        memory.close()


def test_at_checksum():
    cmos = Cmos(64 * MIB, 0, 2)
    total = sum(cmos.read(i) for i in range(0x10, 0x2E))
    assert cmos.read(0x2E) << 8 | cmos.read(0x2F) == total


def fixed_clock(when: datetime) -> Cmos:
    return Cmos(64 * MIB, 0, 1, clock=lambda: when.timestamp())


def test_clock_reads_bcd_24_hour():
    cmos = fixed_clock(datetime(2031, 12, 28, 23, 59, 58, tzinfo=UTC))
    clock = [cmos.read(index) for index in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]
    # 23:59:58, Sunday (day 1; 2031-12-28 is one), the 28th, December, (20)31.
    assert clock == [0x58, 0x59, 0x23, 0x01, 0x28, 0x12, 0x31, 0x20]
    assert cmos.read(0x0A) == 0x26  # UIP clear
    assert cmos.read(0x0B) == 0x02  # 24-hour, BCD
    assert cmos.read(0x0C) == 0
    assert cmos.read(0x0D) == 0x80


def test_clock_binary_and_12_hour_modes():
    cmos = fixed_clock(datetime(2024, 2, 29, 13, 5, 9, tzinfo=UTC))
    cmos.write(0x0B, 0x04)  # binary, 12-hour
    assert [cmos.read(i) for i in (0, 2, 4, 7, 8, 9)] == [9, 5, 0x80 | 1, 29, 2, 24]
    cmos.write(0x0B, 0x00)  # BCD, 12-hour
    assert cmos.read(4) == 0x81
    cmos.write(0x0B, 0x06)  # binary, 24-hour
    assert cmos.read(4) == 13


def test_guest_sets_the_clock():
    now = [datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp()]
    cmos = Cmos(64 * MIB, 0, 1, clock=lambda: now[0])
    cmos.write(0x0B, 0x82)  # SET: updates stop while the fields are written
    for index, value in ((0, 0x30), (2, 0x45), (4, 0x12), (7, 0x15), (8, 0x06), (9, 0x99),
                         (0x32, 0x19)):  # fmt: skip
        cmos.write(index, value)
    now[0] += 100  # while SET is on, the clock reads what was written
    assert cmos.read(0) == 0x30
    cmos.write(0x0B, 0x02)
    now[0] += 5
    assert [cmos.read(i) for i in (0, 2, 4, 7, 8, 9, 0x32)] == [
        0x35, 0x45, 0x12, 0x15, 0x06, 0x99, 0x19,
    ]  # fmt: skip
    # One field without SET: the others keep running.
    cmos.write(2, 0x00)
    assert [cmos.read(i) for i in (0, 2, 4)] == [0x35, 0x00, 0x12]


def test_invalid_date_leaves_the_clock_alone():
    cmos = fixed_clock(datetime(2024, 1, 31, 8, 0, 0, tzinfo=UTC))
    cmos.write(8, 0x02)  # 31 February: not a date
    assert cmos.read(8) == 0x01


def test_cmos_ram_keeps_writes_and_read_only_registers():
    cmos = Cmos(64 * MIB, 0, 1)
    cmos.write(0x50, 0xA5)
    cmos.write(0x7F, 0x11)
    cmos.write(0x0C, 0xFF)
    cmos.write(0x0D, 0x00)
    cmos.write(0x0A, 0xFF)
    assert (cmos.read(0x50), cmos.read(0x7F)) == (0xA5, 0x11)
    assert (cmos.read(0x0C), cmos.read(0x0D)) == (0, 0x80)
    assert cmos.read(0x0A) == 0x7F  # UIP stays clear


def test_ports_index_and_data():
    bus = Bus("port I/O", 1 << 16)
    memory = GuestMemory("64M")
    try:
        cmos = add_cmos(bus, memory, 2)
    finally:
        memory.close()
    claimed = bus.find(0x70)
    assert claimed is not None and (claimed.base, claimed.length) == (0x70, 2)
    assert bus.find(0x71) is claimed and bus.find(0x72) is None

    def access(port: int, data: bytearray, is_write: bool) -> bytearray:
        cmos(port - 0x70, memoryview(data), is_write)
        return data

    access(0x70, bytearray([0x80 | 0x5F]), True)  # bit 7 (NMI disable) is ignored
    assert access(0x71, bytearray(1), False) == bytearray([1])
    assert access(0x70, bytearray(1), False) == bytearray([0xFF])
    # A word access at 0x70 writes the index, then the data.
    access(0x70, bytearray([0x40, 0x77]), True)
    assert cmos.read(0x40) == 0x77


def test_ports_clash_is_refused():
    bus = Bus("port I/O", 1 << 16)
    bus.add(0x71, 1, lambda *_: None, "something")
    memory = GuestMemory("64M")
    try:
        with pytest.raises(ConfigurationError, match="overlaps"):
            add_cmos(bus, memory, 1)
    finally:
        memory.close()
