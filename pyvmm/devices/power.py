"""ACPI power-off at port 0x604, where QEMU's q35 and i440fx put PM1a control, and the
reset control register at port 0xCF9, where PC chipsets have it.

A write with SLP_EN (bit 13) set, e.g. ``outw(0x604, 0x2000)``, ends the run with status 0,
as it powers off QEMU. A write with bit 2 set to port 0xCF9 (``outb(0xCF9, 0x06)``, what the
FADT's reset register tells an OS to do) ends it as a reboot, status 38. Both are served in
the C run loop; this module only claims the ports.
"""

from __future__ import annotations

from pyvmm._native import lib
from pyvmm.bus import Bus, NativeHandler

PM1A_CONTROL_PORT = 0x604
RESET_CONTROL_PORT = 0xCF9


def add_power_off(bus: Bus, port: int = PM1A_CONTROL_PORT) -> None:
    """Claim the PM1a control register (a word) on a port I/O bus."""
    bus.add(port, 2, NativeHandler(lib.PYVMM_HANDLER_POWEROFF), "acpi-pm1a-control")


def add_reset_control(bus: Bus, port: int = RESET_CONTROL_PORT) -> None:
    """Claim the reset control register (a byte) on a port I/O bus."""
    bus.add(port, 1, NativeHandler(lib.PYVMM_HANDLER_RESET), "reset-control")
