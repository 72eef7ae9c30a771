"""Bus registration: overlap checks and the compiled table (pure logic, no KVM)."""

from __future__ import annotations

import pytest

from pyvmm._native import ffi, lib
from pyvmm.bus import Bus
from pyvmm.errors import ConfigurationError


def handler(offset: int, data: memoryview, is_write: bool) -> None:
    pass


def test_ranges_sorted_and_compiled():
    bus = Bus("port I/O", 1 << 16)
    bus.add(0x3F8, 8, handler, "uart")
    bus.add(0x70, 2, handler, "rtc")
    bus.add_fd(0x100, 0x10, fd=7, fd_offset=0x40)
    table = bus.compile()
    assert table.count == 3
    assert [table.ranges[i].base for i in range(3)] == [0x70, 0x100, 0x3F8]
    assert table.ranges[1].kind == lib.PYVMM_HANDLER_FD
    assert (table.ranges[1].fd, table.ranges[1].fd_offset) == (7, 0x40)
    assert table.ranges[0].kind == lib.PYVMM_HANDLER_PYTHON
    assert bus.python_handlers() == [handler, None, handler]
    assert bus.find(0x3FF).name == "uart" and bus.find(0x400) is None


@pytest.mark.parametrize(("base", "length"), [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x20)])
def test_overlaps_are_refused(base, length):
    bus = Bus("port I/O", 1 << 16)
    bus.add(0x3F8, 8, handler, "uart")
    with pytest.raises(ConfigurationError, match="overlaps uart"):
        bus.add(base, length, handler, "new")


def test_adjacent_ranges_are_fine():
    bus = Bus("MMIO", 1 << 52)
    bus.add(0x1000, 0x1000, handler, "a")
    bus.add(0x2000, 0x1000, handler, "b")
    bus.add(0x0, 0x1000, handler, "c")
    assert [r.name for r in bus.ranges] == ["c", "a", "b"]


@pytest.mark.parametrize(("base", "length"), [(0xFFFF, 2), (-1, 1), (0, 0)])
def test_out_of_bus_ranges_are_refused(base, length):
    with pytest.raises(ConfigurationError, match="outside the bus"):
        Bus("port I/O", 1 << 16).add(base, length, handler)


def test_buffer_range_keeps_its_memory_and_points_the_table_at_it():
    bus = Bus("MMIO", 1 << 52)
    buffer = bus.add_buffer(0xD000_0000, 32, "mailbox")
    table = bus.compile()
    assert table.ranges[0].kind == lib.PYVMM_HANDLER_BUFFER
    assert int(ffi.cast("uintptr_t", table.ranges[0].device)) == buffer.ctypes.data
    assert buffer.shape == (32,) and not buffer.any()


def test_an_access_is_served_by_the_table_that_found_it():
    """A bus that changes under running vCPUs keeps every compiled table's handlers, so an
    index the C loop found in an old table still names the right handler."""
    bus = Bus("MMIO", 1 << 32)

    def first(*_):
        pass

    def second(*_):
        pass

    bus.add(0x2000, 0x100, second, "second")
    swapped = []
    bus.watchers.append(swapped.append)
    old = int(ffi.cast("uintptr_t", bus.compile()))
    bus.add(0x1000, 0x100, first, "first")  # sorts before: every index moves
    new = int(ffi.cast("uintptr_t", swapped[-1]))
    assert new != old
    assert bus.tables[old][0][0] is second and bus.tables[old][1][0].name == "second"
    assert bus.tables[new][0][0] is first and bus.tables[new][0][1] is second
