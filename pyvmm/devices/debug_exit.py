"""QEMU's isa-debug-exit at port 0xF4: a guest write of v ends the run with (v << 1) | 1.

Test guests written for ``qemu -device isa-debug-exit,iobase=0xf4`` report unchanged. The
access is served in the C run loop; this module only claims the port.
"""

from __future__ import annotations

from pyvmm._native import lib
from pyvmm.bus import Bus, NativeHandler

DEBUG_EXIT_PORT = 0xF4


def add_debug_exit(bus: Bus, port: int = DEBUG_EXIT_PORT) -> None:
    """Claim the debug-exit port (byte to dword writes) on a port I/O bus."""
    bus.add(port, 4, NativeHandler(lib.PYVMM_HANDLER_DEBUG_EXIT), "isa-debug-exit")
