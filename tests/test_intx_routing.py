"""PCI INTx routed as PC firmware routes it: every place a guest can learn a slot's IRQ agrees.

A guest may take an assigned device's INTx from the interrupt line register (and program the
8259, level-triggered through the ELCR), from the MP table or the MADT (and program the
IOAPIC), or from the DSDT's _PRT (an ACPI OS). All of them must name the same IRQ for each
slot and pin, and that IRQ must be level-triggered wherever a trigger mode is written down.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from pyvmm import Machine
from pyvmm.acpi import build_acpi_tables
from pyvmm.bus import Bus
from pyvmm.devices.vfio_pci import VfioPciDevice
from pyvmm.irq import GsiRouting
from pyvmm.kvm import Kvm
from pyvmm.memory import MemorySlots
from pyvmm.mptable import build_mp_table
from pyvmm.pci import config as pci
from pyvmm.pci.resources import PciResources
from tests.test_pci import FakeVfioDevice

SLOTS = range(1, 32)
PINS = range(1, 5)
#: MPS INTI flags: active high (01), level-triggered (11).
ACTIVE_HIGH_LEVEL = 0xD


def madt_overrides() -> dict[int, tuple[int, int]]:
    """The MADT's interrupt source overrides: {ISA IRQ: (GSI, flags)}."""
    madt = build_acpi_tables(2).tables["APIC"][1]
    overrides, offset = {}, 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        if kind == 2:
            bus, irq, gsi, flags = struct.unpack_from("<BBIH", madt, offset + 2)
            assert bus == 0
            overrides[irq] = (gsi, flags)
        offset += length
    return overrides


def mp_interrupts() -> list[tuple[int, int, int, int]]:
    """The MP table's I/O interrupt entries: (bus ID, source IRQ, IOAPIC pin, flags)."""
    _, table = build_mp_table(2)
    entries, offset = [], 44
    while offset < len(table):
        kind = table[offset]
        if kind == 3:
            _, _, flags, bus, irq, _, pin = struct.unpack_from("<BBHBBBB", table, offset)
            entries.append((bus, irq, pin, flags))
        offset += 20 if kind == 0 else 8
    return entries


def test_links_rotate_over_the_slots_as_on_piix() -> None:
    # SeaBIOS's pci_irqs (10, 10, 11, 11), links A-D rotated by slot as on QEMU's i440fx.
    assert [pci.intx_irq(slot, 1) for slot in range(1, 9)] == [10, 10, 11, 11] * 2
    assert [pci.intx_irq(1, pin) for pin in PINS] == [10, 10, 11, 11]
    assert [pci.intx_irq(2, pin) for pin in PINS] == [10, 11, 11, 10]
    assert pci.level_triggered_irqs() == (10, 11)
    assert set(pci.LINK_IRQS) <= set(pci.PCI_IRQS)


def test_madt_overrides_every_pci_irq_level_triggered_active_high() -> None:
    overrides = madt_overrides()
    assert overrides[0] == (2, 0)  # the PIT
    for irq in pci.PCI_IRQS:
        assert overrides[irq] == (irq, ACTIVE_HIGH_LEVEL), irq


def test_mp_table_names_each_slots_irq_on_the_same_ioapic_pin() -> None:
    entries = mp_interrupts()
    pci_entries = {(irq >> 2, (irq & 3) + 1): (pin, flags) for bus, irq, pin, flags in entries
                   if bus == 0}  # fmt: skip
    for slot in SLOTS:
        for pin in PINS:
            ioapic_pin, flags = pci_entries[slot, pin]
            assert ioapic_pin == pci.intx_irq(slot, pin), (slot, pin)
            # Active high; trigger "conforms": level, on the PCI bus.
            assert flags == 1, (slot, pin)
    isa = {irq: (pin, flags) for bus, irq, pin, flags in entries if bus == 1}
    # No ISA entry contradicts PCI's use of an IRQ (edge-triggered, as ISA conforms to).
    for irq in pci.PCI_IRQS:
        assert irq not in isa or isa[irq] == (irq, ACTIVE_HIGH_LEVEL), irq


IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl not installed (apt-get install acpica-tools)")
def test_prt_names_each_slots_irq(tmp_path) -> None:
    (tmp_path / "dsdt.dat").write_bytes(build_acpi_tables(2).tables["DSDT"][1])
    done = subprocess.run(
        [IASL, "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (tmp_path / "dsdt.dsl").read_text()
    prt = text[text.index("Name (_PRT") :]

    def value(token: str) -> int:
        named = {"Zero": 0, "One": 1}
        return named[token] if token in named else int(token, 16)

    rows = re.findall(r"Package \(0x04\)\s*\{\s*(\w+),\s*(\w+),\s*(\w+),\s*(\w+)\s*\}", prt)
    routed = {(value(a) >> 16, value(p) + 1): (value(s), value(g)) for a, p, s, g in rows}
    assert len(routed) == len(SLOTS) * len(PINS)
    for slot in SLOTS:
        for pin in PINS:
            # Source Zero: hard-wired, the last field is the GSI, the IRQ of the same number.
            assert routed[slot, pin] == (0, pci.intx_irq(slot, pin)), (slot, pin)


def test_elcr_marks_the_routed_irqs_level_triggered(kvm_required) -> None:
    with Machine(memory="16M", irqchip=True) as machine:
        elcr = machine.vm.pic_elcr()
    assert elcr == sum(1 << irq for irq in pci.level_triggered_irqs()) == 0x0C00


def test_interrupt_line_register_holds_the_slots_irq(kvm_required) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        routing = GsiRouting(vm)
        resources = PciResources(64 << 20)
        for slot in range(1, 6):
            pio, mmio = Bus("port I/O", 1 << 16), Bus("MMIO", 1 << 52)
            device = VfioPciDevice(
                FakeVfioDevice(), slot, vm=vm, pio=pio, mmio=mmio, routing=routing,
                slots=MemorySlots(1), resources=resources, guest_ram=[(0, 64 << 20)],
            )  # fmt: skip
            try:
                line = device.config_read(pci.INTERRUPT_LINE, 1)
                pin = device.config_read(pci.INTERRUPT_PIN, 1)
                assert line == pci.intx_irq(slot, pin), slot
                # The INTx irqfd goes to the GSI of that IRQ: 8259 input and IOAPIC pin.
                assert device.intx is not None and device.intx.gsi == line
            finally:
                device.close()


@pytest.mark.parametrize("guest", ["intx_pic", "intx_ioapic"])
def test_intx_guests_fail_cleanly_without_a_device(run_guest, guest) -> None:
    result = run_guest(guest, timeout=30)
    assert result.exit_status == 3, result.serial_text  # guest_exit(1): not found
    assert "FAIL: no edu (1234:11e8) or mtty (4348:3253) on bus 0" in result.serial_text
