"""ACPI power-off at port 0x604, where QEMU's q35 and i440fx put PM1a control.

A write with SLP_EN (bit 13) set, e.g. ``outw(0x604, 0x2000)``, ends the run with status 0,
as it powers off QEMU. Served in the C run loop; this module only claims the port.
"""

from __future__ import annotations

from pyvmm._native import lib
from pyvmm.bus import Bus, NativeHandler

PM1A_CONTROL_PORT = 0x604


def add_power_off(bus: Bus, port: int = PM1A_CONTROL_PORT) -> None:
    """Claim the PM1a control register (a word) on a port I/O bus."""
    bus.add(port, 2, NativeHandler(lib.PYVMM_HANDLER_POWEROFF), "acpi-pm1a-control")
