"""Forwarded ranges whose fd fails, on the real /dev/kvm: strict ends the run, tolerant goes on.

The fds fail in the kernel, not in a fake: pread and pwrite on a pipe are ESPIPE; pwrite on
a file opened read-only is EBADF. The guest, unclaimed_mmio, reads a dword at 0xE0000000,
prints it, writes a dword there and ends with guest_exit(2) (status 5).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from pyvmm import ExitStatus, Machine
from pyvmm._native import ffi, lib
from pyvmm.bus import FirstFault, ForwardFaults, NativeHandler

WINDOW = 0xE000_0000
#: Where on the fd the window starts: the recorded offset is on the fd, not in the window.
FD_OFFSET = 0x100
GUEST_STATUS = 5


@pytest.fixture
def pipe_end() -> Iterator[int]:
    """The read end of a pipe: every pread and pwrite on it fails with ESPIPE."""
    read_end, write_end = os.pipe()
    yield read_end
    os.close(read_end)
    os.close(write_end)


def test_strict_forward_ends_the_run_on_a_failing_fd(run_guest, pipe_end):
    def setup(machine: Machine) -> None:
        assert machine.forward_mmio(WINDOW, 0x1000, pipe_end, FD_OFFSET) is None

    result = run_guest("unclaimed_mmio", setup=setup)
    assert (result.outcome, result.exit_status) == ("device-error", ExitStatus.DEVICE_ERROR)
    assert "forwarded access failed: ESPIPE" in result.message
    assert "read " not in result.serial_text  # the guest never got its value


def test_tolerant_forward_reads_ones_drops_writes_and_records(run_guest, pipe_end):
    faults: list[ForwardFaults | None] = []

    def setup(machine: Machine) -> None:
        faults.append(machine.forward_mmio(WINDOW, 0x1000, pipe_end, FD_OFFSET, tolerant=True))

    result = run_guest("unclaimed_mmio", setup=setup)
    assert (result.outcome, result.exit_status) == ("exit", GUEST_STATUS), result.message
    assert "read ffffffff" in result.serial_text
    record = faults[0]
    assert record is not None
    assert record.count == 2  # the read, then the write
    assert record.first == FirstFault(FD_OFFSET, errno.ESPIPE, 4, False)
    assert result.unclaimed_mmio.count == 0  # served (and refused) by the range, not unclaimed


def test_tolerant_forward_drops_a_failing_write_and_keeps_good_reads(run_guest):
    backing = os.memfd_create("read-only window")
    os.pwrite(backing, struct.pack("<I", 0x600DCAFE), FD_OFFSET)
    read_only = os.open(f"/proc/self/fd/{backing}", os.O_RDONLY)
    faults: list[ForwardFaults | None] = []

    def setup(machine: Machine) -> None:
        faults.append(machine.forward_mmio(WINDOW, 0x1000, read_only, FD_OFFSET, tolerant=True))

    try:
        result = run_guest("unclaimed_mmio", setup=setup)
        contents = os.pread(backing, 4, FD_OFFSET)
    finally:
        os.close(read_only)
        os.close(backing)
    assert (result.outcome, result.exit_status) == ("exit", GUEST_STATUS), result.message
    assert "read 600dcafe" in result.serial_text
    assert contents == struct.pack("<I", 0x600DCAFE)  # the write went nowhere
    record = faults[0]
    assert record is not None
    assert record.count == 1
    assert record.first == FirstFault(FD_OFFSET, errno.EBADF, 4, True)


def test_tolerant_port_forward_reads_ones_for_the_whole_access(run_guest, pipe_end):
    """Ports take the same path: straddle reads and writes a dword at port 0x511, across the
    end of ports 0x510-0x511; the byte inside fails on the fd, so the whole dword is ones."""
    faults: list[ForwardFaults | None] = []

    def setup(machine: Machine) -> None:
        faults.append(machine.forward_pio(0x510, 2, pipe_end, FD_OFFSET, tolerant=True))

    result = run_guest("straddle", setup=setup)
    assert (result.outcome, result.exit_status) == ("exit", 0), result.message
    assert result.serial_text.endswith("port ffffffff\n"), result.serial_text
    record = faults[0]
    assert record is not None
    assert record.count == 2
    assert record.first == FirstFault(FD_OFFSET + 1, errno.ESPIPE, 4, False)


def test_tolerant_msix_window_forwards_the_rest_tolerantly(run_guest, pipe_end):
    """An MSI-X window (table emulated, the rest forwarded, as for a PBA) with a failing fd:
    unclaimed_mmio's accesses at the window's offset 0 miss the table at 0x800, so they go
    to the fd and fail, and the guest goes on."""
    table = np.zeros(16, dtype=np.uint8)
    faults = ForwardFaults()
    keep = []

    def setup(machine: Machine) -> None:
        window = ffi.new(
            "struct pyvmm_msix_window *",
            {"table_offset": 0x800, "table_size": 16, "table": ffi.from_buffer(table)},
        )
        keep.append(window)
        handler = NativeHandler(
            lib.PYVMM_HANDLER_MSIX,
            fd=pipe_end,
            fd_offset=FD_OFFSET,
            device=window,
            keep=window,
            python=lambda offset, data, is_write: None,
            faults=faults,
        )
        machine.mmio.add(WINDOW, 0x1000, handler, "MSI-X window")

    result = run_guest("unclaimed_mmio", setup=setup)
    assert (result.outcome, result.exit_status) == ("exit", GUEST_STATUS), result.message
    assert "read ffffffff" in result.serial_text
    assert faults.count == 2
    assert faults.first == FirstFault(FD_OFFSET, errno.ESPIPE, 4, False)
    assert not table.any()  # the table was not touched
