"""QEMU's pci-testdev (1b36:0005): the PCI function kvm-unit-tests' pci test drives.

As hw/misc/pci-testdev.c defines it: BAR 0 is 4 KiB of memory, BAR 1 256 I/O ports, and
with `membar=N` BAR 2 is a 64-bit prefetchable memory BAR of N bytes that reads 0 and drops
writes (QEMU's is an empty region). BARs 0 and 1 reach the same registers, a byte at a time:

- writing t to offset 0 selects test t of that BAR's kind (0 no-eventfd, 1 wildcard-eventfd,
  2 datamatch-eventfd; anything else selects none) and zeroes its count;
- reading gives the selected test's header, a byte at a time: test (u8, offset 0), width
  (u8, 1), offset (u32, 4), data (u8, 8), count (u32, 12), then its NUL-terminated name
  ("mmio-no-eventfd", ..., "portio-datamatch-eventfd"); with no test selected, or past the
  header, a read gives 0;
- a byte written at the test's offset counts, if the test matches any data or the byte is
  its data (0xFA).

The two eventfd tests are what their names say: while one is selected, a KVM ioeventfd at
its offset (matching its data, for datamatch) takes the write inside KVM, so it never reaches
the device and the count stays 0, as under QEMU; reading the registers drains the eventfd.
Without a VM (host tests) every write is counted. Registers are served by Python handlers:
only test guests use them.
"""

from __future__ import annotations

import os
from typing import Protocol

from pyvmm.bus import Bus
from pyvmm.errors import ConfigurationError
from pyvmm.kvm import Vm
from pyvmm.pci.config import (
    BAR0,
    BAR_IO,
    BAR_MEMORY_64,
    BAR_PREFETCHABLE,
    CLASS_REVISION,
    COMMAND,
    COMMAND_IO,
    COMMAND_MEMORY,
    CONFIG_SPACE_SIZE,
    VENDOR_ID,
)

VENDOR = 0x1B36
DEVICE = 0x0005
#: PCI_CLASS_OTHERS as QEMU stores it: 0xFF in the subclass byte, base class 0.
CLASS_CODE = 0x00FF00
#: Every QEMU PCI function's subsystem: Red Hat/Qumranet, "QEMU".
SUBSYSTEM_VENDOR = 0x1AF4
SUBSYSTEM = 0x1100
SUBSYSTEM_VENDOR_ID = 0x2C
MEMORY_SIZE = 0x1000
IO_SIZE = 0x100

_TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
_KINDS = ("mmio", "portio")
_DATA_MATCH = 0xFA
_NO_MATCH = 0xCE
_COUNT = 12
_MEMBAR_INDEX = 2
#: Per byte of the command register: I/O, memory, bus master, parity; SERR, INTx disable.
_COMMAND_WRITABLE = (0x47, 0x05)
#: KVM_CAP_IOEVENTFD_ANY_LENGTH: an ioeventfd of length 0 takes a write of any width.
_CAP_IOEVENTFD_ANY_LENGTH = 122


def _header(index: int) -> bytearray:
    """Test index's header (QEMU's PCITestDevHdr) and name: kind-major, as QEMU numbers them."""
    kind, test = _KINDS[index // len(_TESTS)], _TESTS[index % len(_TESTS)]
    base = MEMORY_SIZE // 2 if kind == "mmio" else IO_SIZE // 2
    header = bytearray(16)
    header[0], header[1] = index, 1
    header[4:8] = (base + index).to_bytes(4, "little")
    header[8] = _NO_MATCH if test == "wildcard-eventfd" else _DATA_MATCH
    return header + f"{kind}-{test}".encode() + b"\0"


class PciTestdev:
    """The function: its configuration space, its BARs on the buses, and the test state."""

    def __init__(
        self, pio: Bus, mmio: Bus, memory_bar: int, io_bar: int, membar: int = 0,
        membar_size: int = 0, vm: Vm | None = None,
    ) -> None:  # fmt: skip
        self.pio, self.mmio = pio, mmio
        self.vm = vm
        #: one eventfd, shared by the tests in turn (QEMU gives each its own; one is armed)
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if vm else -1
        #: the ioeventfd registered now: (address, length, is_io, datamatch)
        self._armed: tuple[int, int, bool, int | None] | None = None
        self.space = bytearray(CONFIG_SPACE_SIZE)
        self.space[VENDOR_ID:4] = (VENDOR | DEVICE << 16).to_bytes(4, "little")
        self.space[CLASS_REVISION : CLASS_REVISION + 4] = (CLASS_CODE << 8).to_bytes(4, "little")
        self.space[SUBSYSTEM_VENDOR_ID : SUBSYSTEM_VENDOR_ID + 4] = (
            SUBSYSTEM_VENDOR | SUBSYSTEM << 16
        ).to_bytes(4, "little")
        #: per BAR index: (size, flag bits); the registers hold address | flags
        self.bars: dict[int, tuple[int, int]] = {0: (MEMORY_SIZE, 0), 1: (IO_SIZE, BAR_IO)}
        self._set_bar(0, memory_bar)
        self._set_bar(1, io_bar)
        if membar_size:
            self.bars[_MEMBAR_INDEX] = (membar_size, BAR_MEMORY_64 | BAR_PREFETCHABLE)
            self._set_bar(_MEMBAR_INDEX, membar)
        self.headers = [_header(index) for index in range(len(_TESTS) * len(_KINDS))]
        self.current: int | None = None
        #: what is claimed now, per BAR index: (bus, base)
        self._mapped: dict[int, tuple[Bus, int]] = {}

    def close(self) -> None:
        """Release the ioeventfd and its eventfd."""
        self._disarm()
        if self.eventfd >= 0:
            os.close(self.eventfd)
            self.eventfd = -1

    def _arm(self) -> None:
        """Register the selected eventfd test's ioeventfd where its BAR decodes now."""
        if self.vm is None or self.current is None or self.current % len(_TESTS) == 0:
            return
        is_io = self.current >= len(_TESTS)
        mapped = self._mapped.get(1 if is_io else 0)
        if mapped is None:
            return
        header = self.headers[self.current]
        address = mapped[1] + int.from_bytes(header[4:8], "little")
        datamatch = header[8] if header[8] == _DATA_MATCH else None
        # As QEMU: a wildcard MMIO test takes writes of any width where KVM can.
        any_length = self.vm.kvm.check_extension(_CAP_IOEVENTFD_ANY_LENGTH) > 0
        length = 0 if not is_io and datamatch is None and any_length else 1
        self.vm.ioeventfd(self.eventfd, address, length, pio=is_io, datamatch=datamatch)
        self._armed = (address, length, is_io, datamatch)

    def _disarm(self) -> None:
        if self._armed is None:
            return
        address, length, is_io, datamatch = self._armed
        self._armed = None
        self.vm.ioeventfd(
            self.eventfd, address, length, pio=is_io, datamatch=datamatch, deassign=True
        )

    def _drain(self) -> None:
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass  # nothing signalled since the last read

    def _set_bar(self, index: int, address: int) -> None:
        size, flags = self.bars[index]
        value = (address & ~(size - 1)) | flags
        width = 8 if flags & BAR_MEMORY_64 else 4
        offset = BAR0 + 4 * index
        self.space[offset : offset + width] = value.to_bytes(width, "little")

    def _bar_address(self, index: int) -> int:
        flags = self.bars[index][1]
        width = 8 if flags & BAR_MEMORY_64 else 4
        offset = BAR0 + 4 * index
        value = int.from_bytes(self.space[offset : offset + width], "little")
        return value & ~(0x3 if flags & BAR_IO else 0xF)

    def config_read(self, offset: int, size: int) -> int:
        """Read the function's configuration space."""
        return int.from_bytes(self.space[offset : offset + size].ljust(size, b"\0"), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write the command register or a BAR (sized as hardware does); the rest is fixed."""
        data = value.to_bytes(size, "little")
        for position in range(offset, offset + size):
            byte = data[position - offset]
            if COMMAND <= position < COMMAND + 2:
                self.space[position] = byte & _COMMAND_WRITABLE[position - COMMAND]
            elif BAR0 <= position < BAR0 + 24:
                self._write_bar_byte(position, byte)
        self._remap()

    def _write_bar_byte(self, position: int, byte: int) -> None:
        index = (position - BAR0) // 4
        if index - 1 in self.bars and self.bars[index - 1][1] & BAR_MEMORY_64:
            size, flags = self.bars[index - 1]
            low = BAR0 + 4 * (index - 1)
        elif index in self.bars:
            size, flags = self.bars[index]
            low = BAR0 + 4 * index
        else:
            return  # an unimplemented BAR reads 0 and keeps it
        width = 8 if flags & BAR_MEMORY_64 else 4
        value = bytearray(self.space[low : low + width])
        value[position - low] = byte
        number = int.from_bytes(value, "little")
        # The bits below the size and the flag bits are read-only, as in every BAR.
        number = (number & ~(size - 1) & ((1 << 8 * width) - 1)) | flags
        self.space[low : low + width] = number.to_bytes(width, "little")

    def _remap(self) -> None:
        self._disarm()
        self._map_bars()
        self._arm()

    def _map_bars(self) -> None:
        command = self.space[COMMAND]
        for index, (size, flags) in self.bars.items():
            is_io = bool(flags & BAR_IO)
            bus = self.pio if is_io else self.mmio
            enabled = command & (COMMAND_IO if is_io else COMMAND_MEMORY)
            base = self._bar_address(index)
            wanted = (bus, base) if enabled and base and base + size <= bus.size else None
            if self._mapped.get(index) == wanted:
                continue
            if index in self._mapped:
                old_bus, old_base = self._mapped.pop(index)
                old_bus.remove(old_base)
            if wanted is not None:
                handler = self._io_access if is_io else self._memory_access
                if index == _MEMBAR_INDEX:
                    handler = self._empty_access
                try:
                    bus.add(base, size, handler, f"pci-testdev BAR {index}")
                except ConfigurationError:
                    continue  # placed over something else: it does not decode there
                self._mapped[index] = wanted

    def _empty_access(self, offset: int, data: memoryview, is_write: bool) -> None:
        # QEMU's membar is an empty region: a read finds nothing (0), a write is dropped.
        if not is_write:
            data[:] = bytes(len(data))

    def _memory_access(self, offset: int, data: memoryview, is_write: bool) -> None:
        self._access(0, offset, data, is_write)

    def _io_access(self, offset: int, data: memoryview, is_write: bool) -> None:
        self._access(1, offset, data, is_write)

    def _access(self, kind: int, offset: int, data: memoryview, is_write: bool) -> None:
        # QEMU's regions take one byte at a time: a wider access is that many byte accesses.
        for index in range(len(data)):
            if is_write:
                self._write_byte(kind, offset + index, data[index])
            else:
                data[index] = self._read_byte(offset + index)

    def _write_byte(self, kind: int, offset: int, byte: int) -> None:
        if offset == 0:
            self._disarm()
            self.current = None
            if byte < len(_TESTS):
                self.current = kind * len(_TESTS) + byte
                self.headers[self.current][_COUNT : _COUNT + 4] = bytes(4)
                self._arm()
            return
        if self.current is None:
            return
        header = self.headers[self.current]
        if offset != int.from_bytes(header[4:8], "little"):
            return
        if header[8] == _DATA_MATCH and byte != _DATA_MATCH:
            return
        count = int.from_bytes(header[_COUNT : _COUNT + 4], "little") + 1
        header[_COUNT : _COUNT + 4] = (count & 0xFFFFFFFF).to_bytes(4, "little")

    def _read_byte(self, offset: int) -> int:
        if self.current is None:
            return 0
        header = self.headers[self.current]
        if offset + 1 >= len(header):
            return 0
        if self._armed is not None:
            self._drain()
        return header[offset]


class PciHost(Protocol):
    """What plugging in a function needs of the machine (Machine has it)."""

    pio: Bus
    mmio: Bus
    vm: Vm

    def place_memory_bar(self, size: int, is_64: bool) -> int:
        """Place a memory BAR; its address."""
        ...

    def place_io_bar(self, size: int) -> int:
        """Place an I/O BAR; its first port."""
        ...

    def add_pci_function(self, function: PciTestdev) -> int:
        """Plug the function into the next free slot; the slot."""
        ...


def add_pci_testdev(host: PciHost, membar_size: int = 0) -> PciTestdev:
    """Plug in a pci-testdev with its BARs placed as firmware would (command left 0)."""
    if membar_size & (membar_size - 1):
        raise ConfigurationError(
            f"--device pci-testdev: membar={membar_size:#x} is not a power of 2"
        )
    memory_bar = host.place_memory_bar(MEMORY_SIZE, False)
    io_bar = host.place_io_bar(IO_SIZE)
    membar = host.place_memory_bar(membar_size, True) if membar_size else 0
    function = PciTestdev(host.pio, host.mmio, memory_bar, io_bar, membar, membar_size, vm=host.vm)
    host.add_pci_function(function)
    return function
