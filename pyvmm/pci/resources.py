"""BAR placement: what firmware does before an OS runs, done by pyvmm before the guest starts.

Memory BARs go in the 32-bit PCI window below the test windows at 0xD000_0000, each
naturally aligned and at least a page (so a BAR can be a KVM memory slot, and two BARs never
share a page); 64-bit BARs that do not fit there go in the 64-bit window above the top of
RAM (layout.high_window, which the DSDT declares too). I/O BARs go in
0xC000-0xFFFF. See docs/guest-abi.md.
"""

from __future__ import annotations

from pyvmm.errors import ConfigurationError
from pyvmm.layout import HIGH_WINDOW_SIZE, high_window
from pyvmm.memory import PAGE_SIZE

MEMORY_WINDOW = (0xC000_0000, 0xD000_0000)
IO_WINDOW = (0xC000, 0x1_0000)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class PciResources:
    """Bump allocators for the memory window, the I/O window and the space above RAM."""

    def __init__(self, ram_top: int) -> None:
        self.next_memory = MEMORY_WINDOW[0]
        self.next_io = IO_WINDOW[0]
        self.next_high, self.high_end = high_window(ram_top)
        #: One past the highest BAR placed above RAM (0 while there is none).
        self.high_top = 0

    def memory(self, size: int, is_64: bool) -> int:
        """Place a memory BAR of size bytes; returns its guest-physical address."""
        size = max(size, PAGE_SIZE)
        base = _align(self.next_memory, size)
        if base + size <= MEMORY_WINDOW[1]:
            self.next_memory = base + size
            return base
        if not is_64:
            raise ConfigurationError(
                f"a 32-bit BAR of {size:#x} bytes does not fit in the PCI memory window "
                f"[{MEMORY_WINDOW[0]:#x}, {MEMORY_WINDOW[1]:#x}): assign fewer devices"
            )
        base = _align(self.next_high, size)
        if base + size > self.high_end:
            raise ConfigurationError(
                f"a 64-bit BAR of {size:#x} bytes does not fit in the 64-bit PCI window "
                f"[{self.high_end - HIGH_WINDOW_SIZE:#x}, {self.high_end:#x}) "
                f"({HIGH_WINDOW_SIZE >> 30} GiB): assign fewer or smaller devices"
            )
        self.next_high = self.high_top = base + size
        return base

    def io(self, size: int) -> int:
        """Place an I/O BAR of size ports; returns its first port."""
        base = _align(self.next_io, max(size, 4))
        if base + size > IO_WINDOW[1]:
            raise ConfigurationError(
                f"an I/O BAR of {size} ports does not fit in 0xC000-0xFFFF: assign fewer devices"
            )
        self.next_io = base + size
        return base
