"""Bus tables swapped under running vCPUs, and forwarded ranges clipped at their end (real KVM).

The stress test moves ranges (remove, then add again: what a guest moving a BAR makes pyvmm
do) from host threads, and each vCPU moves the BAR of a PCI function of its own through
ECAM, while 4 vCPUs hammer them (guests/bus_stress.c): every access must be
served by the range it addressed or read all ones while that range is gone, the hit counts
must add up to what the guest counted, and the retired tables alive stay at most one per vCPU.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import numpy as np

from pyvmm import Machine, guest_path
from pyvmm._native import ffi, lib
from pyvmm.bus import Bus, NativeHandler
from pyvmm.pci.config import BAR0, COMMAND_MEMORY

CPUS = 4
RANGES = 4
MMIO_BASE = 0xD001_0000
PORT_BASE = 0x700
CONTROL = 0xD000_0000
#: Remove + add pairs per mover thread; two movers per bus (MMIO and port I/O).
MOVES_PER_MOVER = 2500
MOVES_PER_BUS = 2 * MOVES_PER_MOVER
#: Also sorts first or not (a range below the moved ones, added and removed): every index in
#: the table shifts, so a handler found by an old table's index would answer wrongly.
SHIFTER = {"mmio": 0xD000_F000, "pio": 0x6F0}


def mmio_contents(index: int) -> np.ndarray:
    """The bytes of MMIO range index: dword at offset o is 0xA0000000 | index << 16 | o."""
    offsets = np.arange(0, 0x100, 4, dtype=np.uint32)
    return (np.uint32(0xA000_0000) | np.uint32(index << 16) | offsets).astype("<u4").view(np.uint8)


def port_handler(index: int):
    """A Python handler for port range index: inl at offset o reads 0xB0000000 | index << 16 | o."""

    def serve(offset: int, data: memoryview, is_write: bool) -> None:
        if not is_write:
            data[:] = struct.pack("<I", 0xB000_0000 | index << 16 | offset)[: len(data)]

    return serve


def add_mmio_range(bus: Bus, index: int) -> None:
    """Add MMIO range index, natively served from host memory filled before it is claimed."""
    contents = mmio_contents(index).copy()
    handler = NativeHandler(
        lib.PYVMM_HANDLER_BUFFER, device=ffi.from_buffer(contents), keep=contents
    )
    bus.add(MMIO_BASE + index * 0x1000, 0x100, handler, f"moved-mmio-{index}")


def add_port_range(bus: Bus, index: int) -> None:
    """Add port range index, served by a new Python handler."""
    bus.add(PORT_BASE + index * 0x10, 0x10, port_handler(index), f"moved-port-{index}")


class MovableFunction:
    """An emulated PCI function with one 4 KiB memory BAR0, which moves where the guest writes
    it (guests/bus_stress.c): its dword at offset o reads 0xC0000000 | owner << 16 | o."""

    def __init__(self, owner: int, mmio: Bus, base: int) -> None:
        self.owner = owner
        self.mmio = mmio
        self.base = base
        offsets = np.arange(0, 0x1000, 4, dtype=np.uint32)
        self.contents = (
            (np.uint32(0xC000_0000) | np.uint32(owner << 16) | offsets).astype("<u4").view(np.uint8)
        )
        self._claim()

    def _claim(self) -> None:
        handler = NativeHandler(
            lib.PYVMM_HANDLER_BUFFER, device=ffi.from_buffer(self.contents), keep=self.contents
        )
        self.mmio.add(self.base, 0x1000, handler, f"bar0 of function {self.owner + 1}")

    def config_read(self, offset: int, size: int) -> int:
        space = bytearray(0x100)
        struct.pack_into("<HHH", space, 0, 0x1234, 0xBA50 + self.owner, COMMAND_MEMORY)
        struct.pack_into("<I", space, BAR0, self.base)
        return int.from_bytes(space[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset == BAR0 and size == 4 and value & ~0xFFF != self.base:
            self.mmio.remove(self.base)
            self.base = value & ~0xFFF
            self._claim()


def test_ranges_moved_under_four_vcpus_are_served_exactly(kvm_required) -> None:
    with Machine(memory="16M", cpus=CPUS, serial="capture") as machine:
        machine.load(guest_path("bus_stress"))
        control = machine.mmio_buffer(CONTROL, 0x1000, "control")
        for cpu in range(CPUS):
            assert (
                machine.add_pci_function(
                    MovableFunction(cpu, machine.mmio, 0xD010_0000 + cpu * 0x2000)
                )
                == cpu + 1
            )
        for index in range(RANGES):
            add_mmio_range(machine.mmio, index)
            add_port_range(machine.pio, index)
        done = threading.Event()
        moved = {"mmio": 0, "pio": 0}
        most_retired = {"mmio": 0, "pio": 0}
        errors: list[BaseException] = []

        def mover(kind: str, bus: Bus, add, indexes: tuple[int, ...], shifter: bool) -> None:
            base, stride = (MMIO_BASE, 0x1000) if kind == "mmio" else (PORT_BASE, 0x10)
            try:
                for move in range(MOVES_PER_MOVER):
                    if done.is_set():
                        return
                    index = indexes[move % len(indexes)]
                    bus.remove(base + index * stride)
                    add(bus, index)
                    if shifter and move % 2:
                        bus.remove(SHIFTER[kind])
                    elif shifter:
                        bus.add(SHIFTER[kind], 0x10, port_handler(99), "shifter")
                    with lock:
                        moved[kind] += 1
                        most_retired[kind] = max(most_retired[kind], bus.retired_tables())
                    time.sleep(0)  # let the vCPU threads' Python handlers in
            except BaseException as error:
                errors.append(error)
            finally:
                with lock:
                    finished.append(kind)
                    if len(finished) == len(movers):
                        control[0] = 1  # the last mover tells the guest to stop

        lock = threading.Lock()
        finished: list[str] = []
        # Two movers per bus: changes to one bus from two threads at once.
        movers = [
            threading.Thread(target=mover, args=(kind, bus, add, indexes, indexes[0] == 0))
            for kind, bus, add in (
                ("mmio", machine.mmio, add_mmio_range),
                ("pio", machine.pio, add_port_range),
            )
            for indexes in ((0, 1), (2, 3))
        ]
        for thread in movers:
            thread.start()
        try:
            result = machine.run(timeout=120)
        finally:
            done.set()
            control[0] = 1
            for thread in movers:
                thread.join()
        assert not errors, errors
        assert result.exit_status == 0, (result.message, result.serial_text)
        counts = control[0x100 : 0x100 + 64 * CPUS].view("<u8").reshape(CPUS, 8)
        mmio_served, mmio_ones, port_served, port_ones, bar_moves = (
            int(c) for c in counts.sum(axis=0)[:5]
        )
        mmio_hits = sum(
            n for (base, name), n in machine.mmio.hits().items() if name.startswith("moved")
        )
        port_hits = sum(
            n for (base, name), n in machine.pio.hits().items() if name.startswith("moved")
        )
        print(
            f"\nbus stress: {CPUS} vCPUs, host moves mmio {moved['mmio']} port {moved['pio']}, "
            f"guest BAR moves {bar_moves}, "
            f"mmio accesses {mmio_served} served + {mmio_ones} all ones, port accesses "
            f"{port_served} served + {port_ones} all ones, most retired tables alive: "
            f"mmio {most_retired['mmio']} port {most_retired['pio']}, exits {result.exits}"
        )
        assert moved == {"mmio": MOVES_PER_BUS, "pio": MOVES_PER_BUS}
        # Every vCPU had accesses served while the ranges moved (the guest checks each value).
        assert all(all(counts[cpu][[0, 2, 4]] > 0) for cpu in range(CPUS)), counts
        # Exact counts across thousands of swaps: the guest's, plus its last read of each range.
        last_reads = CPUS * RANGES
        assert (mmio_hits, port_hits) == (mmio_served + last_reads, port_served + last_reads)
        bar_hits = sum(n for (_, name), n in machine.mmio.hits().items() if name.startswith("bar0"))
        assert bar_hits == bar_moves  # one read at the new place per move; the old is unclaimed
        assert max(most_retired.values()) <= CPUS
        assert machine.mmio.retired_tables() == machine.pio.retired_tables() == 0


def test_a_forwarded_access_straddling_the_end_stays_inside_the_fd_range(run_guest) -> None:
    mmio_fd = os.memfd_create("straddle-mmio")
    port_fd = os.memfd_create("straddle-port")
    try:
        os.write(mmio_fd, bytes(range(0x10, 0x20)))
        os.write(port_fd, bytes([0x5A, 0x6B, 0x7C, 0x8D]))

        def setup(machine: Machine) -> None:
            machine.forward_mmio(0xD000_1000, 8, mmio_fd)
            machine.forward_pio(0x510, 2, port_fd)

        result = run_guest("straddle", setup=setup, timeout=30)
        assert result.exit_status == 0, result.message
        # The 4 bytes inside the range came from the fd; the 4 past its end read as ones.
        assert "mmio ffffffff17161514 port ffffff6b" in result.serial_text
        # The write landed only inside: bytes 4..7 of the fd; 8.. untouched, and no growth.
        assert os.pread(mmio_fd, 0x20, 0) == bytes(range(0x10, 0x14)) + bytes(
            [0x88, 0x77, 0x66, 0x55]
        ) + bytes(range(0x18, 0x20))
        assert os.pread(port_fd, 8, 0) == bytes([0x5A, 0xD4, 0x7C, 0x8D])
    finally:
        os.close(mmio_fd)
        os.close(port_fd)
