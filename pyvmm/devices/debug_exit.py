"""QEMU's isa-debug-exit: a guest write of v ends the run with (v << 1) | 1.

Every machine has one at port 0xF4 (4 ports), so test guests written for ``qemu -device
isa-debug-exit,iobase=0xf4,iosize=4`` report unchanged. ``--device isa-debug-exit,iobase=P,
iosize=S`` puts it elsewhere, with QEMU's defaults (0x501, 2 ports) for what is not given: as
in QEMU, a write of any width at any of its ports ends the run. The access is served in the C
run loop; this module only claims the ports.
"""

from __future__ import annotations

from pyvmm._native import lib
from pyvmm.bus import Bus, NativeHandler
from pyvmm.errors import ConfigurationError

#: Where every machine has one, and how many ports it claims there.
DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_PORTS = 4


def add_debug_exit(bus: Bus, iobase: int = DEBUG_EXIT_PORT, iosize: int = DEBUG_EXIT_PORTS) -> None:
    """Claim iosize debug-exit ports from iobase on a port I/O bus."""
    if iosize < 1:
        raise ConfigurationError(f"isa-debug-exit: iosize must be at least 1, not {iosize}")
    bus.add(iobase, iosize, NativeHandler(lib.PYVMM_HANDLER_DEBUG_EXIT), "isa-debug-exit")
