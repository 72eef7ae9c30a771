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
    """A bus that changes under running vCPUs keeps a table a loop pins, with its handlers, so
    an index the C loop found in an old table still names the right handler."""
    bus = Bus("MMIO", 1 << 32)

    def first(*_):
        pass

    def second(*_):
        pass

    bus.add(0x2000, 0x100, second, "second")
    loop = ffi.new("struct pyvmm_vcpu_loop *")
    bus.attach(loop, is_mmio=True)
    old = int(ffi.cast("uintptr_t", loop.mmio))
    loop.mmio_in_use = loop.mmio  # what the C loop does on an exit that finds a range
    bus.add(0x1000, 0x100, first, "first")  # sorts before: every index moves
    new = int(ffi.cast("uintptr_t", loop.mmio))
    assert new != old and bus.retired_tables() == 1
    assert bus.tables[old][0][0] is second and bus.tables[old][1][0].name == "second"
    assert bus.tables[new][0][0] is first and bus.tables[new][0][1] is second
    loop.mmio_in_use = loop.mmio  # the loop's next exit moves its pin: the old table goes
    bus.remove(0x1000)
    assert bus.retired_tables() == 1 and old not in bus.tables and new in bus.tables


def test_retired_tables_are_freed_once_unpinned_and_their_hits_kept():
    """Thousands of swaps keep at most one retired table per attached loop, and the hit
    counts of every table, freed or not, add up exactly."""
    bus = Bus("MMIO", 1 << 32)
    bus.add(0x1000, 0x10, handler, "a")
    loops = [ffi.new("struct pyvmm_vcpu_loop *") for _ in range(4)]
    for loop in loops:
        bus.attach(loop, is_mmio=True)
    most = 0
    for move in range(3000):
        loop = loops[move % 4]
        loop.mmio_in_use = loop.mmio  # this loop's exit pins the current table
        loop.mmio.ranges[0].hits += 1  # and is counted in it
        bus.remove(0x1000)
        bus.add(0x1000, 0x10, handler, "a")
        most = max(most, bus.retired_tables())
    assert most <= len(loops)
    assert bus.hits() == {(0x1000, "a"): 3000}
    for loop in loops:
        bus.detach(loop)
    assert bus.retired_tables() == 0 and bus.hits() == {(0x1000, "a"): 3000}
    assert len(bus.tables) == 1
