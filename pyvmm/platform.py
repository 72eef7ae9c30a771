"""The PC around a guest: the legacy devices every machine has, and what firmware leaves in
memory for an operating system before it starts.

Every machine gets the CMOS/RTC (0x70/0x71), the ACPI PM1a event block (0x600) next to the
power-off control (0x604), and the reset control register (0xCF9): cheap, and where a PC has
them. A machine that boots like a PC (multiboot, Linux) or has a PCI bus also gets the ACPI
tables and the MP table in the BIOS area, written just before its vCPUs start, so that they
describe the final machine: its CPUs, the IOAPIC, the PCI bus and its ECAM.
"""

from __future__ import annotations

from pyvmm.acpi import add_pm1_event_block, write_acpi_tables
from pyvmm.bus import Bus
from pyvmm.devices.cmos import Cmos, add_cmos
from pyvmm.devices.power import add_reset_control
from pyvmm.ioctl import Cdata
from pyvmm.memory import GuestMemory
from pyvmm.mptable import write_mp_table


def add_legacy_devices(pio: Bus, memory: GuestMemory, cpus: int) -> Cmos:
    """Claim the CMOS/RTC, the PM1a event block and the reset control register."""
    cmos = add_cmos(pio, memory, cpus)
    add_pm1_event_block(pio)
    add_reset_control(pio)
    return cmos


def write_firmware_tables(memory: GuestMemory, cpus: int, supported_cpuid: Cdata) -> int:
    """Write the ACPI tables and the MP table; returns the RSDP's address."""
    rsdp = write_acpi_tables(memory, cpus)
    for i in range(supported_cpuid.nent):
        entry = supported_cpuid.entries[i]
        if entry.function == 1:  # the processor entries carry CPUID leaf 1's EAX and EDX
            write_mp_table(memory, cpus, cpu_signature=entry.eax, cpu_features=entry.edx)
            return rsdp
    write_mp_table(memory, cpus)
    return rsdp
