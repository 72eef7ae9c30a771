"""QEMU's pc-testdev: the ISA test device kvm-unit-tests' x86 suites drive.

As hw/misc/pc-testdev.c places it:

- ports 0xE0-0xE3 and 0xE8-0xEB: one 32-bit scratch register, reached at either window
  by any width at any byte offset (the byte at offset n of the access is byte (port & 3) + n
  of the register);
- port 0xE4: a 32-bit write of a guest-physical address "flushes" its page: the host page
  behind it is made inaccessible and accessible again, so that KVM must drop and rebuild its
  mapping (what kvm-unit-tests' MMU notifier tests want); reads give 0;
- ports 0x2000-0x2017: a byte write of v to 0x2000 + n sets interrupt line n to (v != 0),
  through the in-kernel irqchip (KVM_IRQ_LINE): lines 0-15 reach both the 8259 and the IOAPIC,
  16-23 the IOAPIC only (QEMU asserts on those: its ISA bus has 16 lines); reads give 0;
- MMIO 0xFF000000-0xFF00FFFF: 64 KiB of scratch memory, read back as written.

All but the MMIO window are rare test accesses, so Python handlers serve them; the window is
a host buffer served in the C run loop.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable

import numpy as np

from pyvmm.bus import Bus
from pyvmm.memory import GuestMemory

#: hw/misc/pc-testdev.c's addresses.
SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
SCRATCH_BYTE_PORT = 0xE8
IRQ_LINE_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000

_PAGE = 4096
_PROT_NONE = 0  # Linux's; the mmap module exports only PROT_READ and PROT_WRITE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class PcTestdev:
    """The device's state (its scratch register and window) and its port handlers."""

    def __init__(self, memory: GuestMemory, irq_line: Callable[[int, int], None]) -> None:
        self.memory = memory
        self.irq_line = irq_line
        self.scratch = bytearray(4)
        self.iomem: np.ndarray | None = None
        #: pages the guest asked to flush, for tests to see that the port was reached
        self.flushed: list[int] = []

    def attach(self, pio: Bus, mmio: Bus) -> None:
        """Claim the device's ports and its MMIO window."""
        pio.add(SCRATCH_PORT, 4, self._scratch_access, "pc-testdev-ioport")
        pio.add(FLUSH_PORT, 4, self._flush_access, "pc-testdev-flush-page")
        pio.add(SCRATCH_BYTE_PORT, 4, self._scratch_access, "pc-testdev-ioport-byte")
        pio.add(IRQ_LINE_PORT, IRQ_LINES, self._irq_access, "pc-testdev-irq-line")
        self.iomem = mmio.add_buffer(IOMEM_BASE, IOMEM_SIZE, "pc-testdev-iomem")

    def _scratch_access(self, offset: int, data: memoryview, is_write: bool) -> None:
        # Bytes past the register's end fall outside the device: reads give 0, writes drop.
        for index in range(len(data)):
            position = offset + index
            if is_write:
                if position < 4:
                    self.scratch[position] = data[index]
            else:
                data[index] = self.scratch[position] if position < 4 else 0

    def _flush_access(self, offset: int, data: memoryview, is_write: bool) -> None:
        # QEMU takes only 32-bit writes at the port itself; reads, of any width, give 0.
        if not is_write or offset or len(data) != 4:
            if not is_write:
                data[:] = bytes(len(data))
            return
        page = int.from_bytes(data, "little") & ~(_PAGE - 1)
        region = self.memory.region_of(page, _PAGE)
        if region is None:
            return  # not RAM: nothing of the host's to flush
        host = region.host_address + (page - region.guest_phys_addr)
        _libc.mprotect(host, _PAGE, _PROT_NONE)
        _libc.mprotect(host, _PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
        self.flushed.append(page)

    def _irq_access(self, offset: int, data: memoryview, is_write: bool) -> None:
        # Byte writes only, as QEMU's region takes; reads, of any width, give 0 as there.
        if not is_write:
            data[:] = bytes(len(data))
        elif len(data) == 1:
            self.irq_line(offset, int(data[0] != 0))


def add_pc_testdev(
    pio: Bus, mmio: Bus, memory: GuestMemory, irq_line: Callable[[int, int], None]
) -> PcTestdev:
    """Build a pc-testdev raising lines through irq_line(line, level) and claim its ranges."""
    device = PcTestdev(memory, irq_line)
    device.attach(pio, mmio)
    return device
