"""The multiboot platform kernels on the real /dev/kvm: mb_platform (fw_cfg read both ways against
the multiboot information, CMOS, the CPUs from ACPI and the MP table, INIT/SIPI by MADT APIC ID)
and mb_timers (LAPIC timer, PIT through the MADT's override, IOAPIC-routed UART interrupts),
booted directly and through pyvmm's firmware.

Every printed value is checked against what pyvmm builds: the fw_cfg items, the e820 map, the
CMOS fields, the ACPI tables' addresses and the MADT's overrides. Each is booted through
`pyvmm run` and through the Python API, and each kernel is shown to notice a wrong value.
"""

from __future__ import annotations

import struct

import pytest

import pyvmm.machine
from pyvmm import Machine, guest_path
from pyvmm.acpi import IOAPIC_ADDRESS, IOAPIC_ID, build_acpi_tables
from pyvmm.devices import fw_cfg as fc
from pyvmm.memory import GIB, MIB, parse_size
from pyvmm.mptable import FLOATING_POINTER_ADDRESS
from tests.test_acpi import madt_entries, u16, u32

PLATFORM = guest_path("mb_platform")
TIMERS = guest_path("mb_timers")
#: Every run here ends within a second or two (mb_timers' waits are bounded at 5 s).
TIMEOUT = 60
APPEND = "console=ttyS0 answer=42 quoted='a b'"
#: The line mb_timers sends a byte per transmit-empty interrupt (guests/mb_timers.c).
UART_LINE = "uart: this line went out a byte per THR-empty interrupt"


def ram_layout(size: int) -> tuple[int, int]:
    """(RAM below the 3 GiB hole, top of RAM): RAM above 3 GiB continues at 4 GiB."""
    low = min(size, 3 * GIB)
    return low, size if size == low else 4 * GIB + size - low


def e820_lines(size: int) -> list[str]:
    """etc/e820 as the kernel prints it: RAM, KVM's VMX pages, RAM above 4 GiB."""
    low, _ = ram_layout(size)
    entries = [(0, low, 1), (0xFFFB_C000, 0x4000, 2)]
    if size > low:
        entries.append((4 * GIB, size - low, 1))
    return [f"e820 {a:016x} {n:016x} {t}" for a, n, t in entries]


def platform_output(size: int, cpus: int, append: str) -> list[str]:
    """mb_platform's output for RAM of size bytes, cpus vCPUs and --append append."""
    low, top = ram_layout(size)
    mem_upper = (low - MIB) // 1024
    above_16m = min((low - 16 * MIB) >> 16, 0xFFFF) if low > 16 * MIB else 0
    tables = build_acpi_tables(cpus, top)
    ids = " ".join(str(i) for i in range(cpus))
    return [
        "fw_cfg: signature QEMU id 3 dma signature QEMU CFG",
        f"fw_cfg: ram_size {size:016x} nb_cpus {cpus} max_cpus {cpus}, legacy = dma",
        f'fw_cfg: cmdline "{append}" (size {len(append) + 1}), legacy = dma, the multiboot '
        "command line's after the kernel path",
        f"fw_cfg: etc/e820 at 0020, {len(e820_lines(size)) * 20} bytes, legacy = dma",
        *e820_lines(size),
        f"fw_cfg: etc/e820 agrees with mem_upper {mem_upper} KiB and ram_size",
        f"cmos: extended {min(mem_upper, 0xFFFF)} KiB, above 16M {above_16m} x 64 KiB, "
        f"above 4G {(size - low) >> 16} x 64 KiB, cpus {cpus}: agree with mem_upper and ram_size",
        f"acpi: RSDP at {tables.rsdp_address:#x}, XSDT at {tables.tables['XSDT'][0]:#x}, "
        f"MADT at {tables.tables['APIC'][0]:#x}: {cpus} enabled CPUs, APIC IDs {ids}",
        f"mptable: at {FLOATING_POINTER_ADDRESS:#x}, {cpus} enabled CPUs, APIC IDs {ids}, BSP 0",
        f"smp: started {cpus - 1} APs by INIT/SIPI: {cpus} cpus up, APIC IDs: {ids}",
        "mb_platform: all ok",
    ]


def timers_output() -> list[str]:
    """mb_timers' output, with the MADT's IOAPIC and overrides as pyvmm builds them."""
    entries = madt_entries(build_acpi_tables(1).tables["APIC"][1])
    overrides = {e[3]: (u32(e, 4), u16(e, 8)) for e in entries if e[0] == 2 and e[2] == 0}
    irq0_gsi, irq0_flags = overrides[0]
    uart_gsi = overrides.get(4, (4, 0))[0]
    return [
        f"madt: IOAPIC {IOAPIC_ID} at {IOAPIC_ADDRESS:#x}, {len(overrides)} overrides: "
        f"IRQ 0 -> GSI {irq0_gsi} (flags {irq0_flags:#x}), IRQ 4 -> GSI {uart_gsi}",
        "8259: both masked (IMR ff ff)",
        "8259: ELCR keeps IRQ 5's level bit",
        "pit: channel 2 gated by port 0x61, OUT2 went high",
        "lapic timer: periodic, vector 0x20, 10 ms: at least 3 interrupts",
        f"pit: channel 0 at 100 Hz, IRQ 0 -> GSI {irq0_gsi}: at least 3 interrupts on vector "
        "0x30, 0 at GSI 0",
        UART_LINE,
        f"uart: IRQ 4 -> GSI {uart_gsi}, vector 0x34: {len(UART_LINE) + 2} THR-empty interrupts "
        f"for {len(UART_LINE) + 1} bytes",
        "mb_timers: all ok",
    ]


def test_pyvmm_routes_the_pit_through_an_override():
    # What mb_timers relies on: the PIT's IRQ 0 is not at GSI 0, and COM1 keeps GSI 4. The
    # other four overrides are the PCI IRQs 5, 9, 10 and 11, level-triggered, as QEMU has them.
    assert timers_output()[0] == (
        "madt: IOAPIC 0 at 0xfec00000, 5 overrides: IRQ 0 -> GSI 2 (flags 0x0), IRQ 4 -> GSI 4"
    )


# ---- mb_platform -------------------------------------------------------------------------


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    ("cpus", "memory"), [(1, "64M"), (2, "64M"), (4, "64M"), (2, "5G"), (4, "5G")]
)
def test_platform_kernel_cli(pyvmm_cli, cpus, memory):
    completed = pyvmm_cli(
        "run", str(PLATFORM), "--cpus", str(cpus), "--memory", memory, "--append", APPEND,
        "--timeout", str(TIMEOUT),
    )  # fmt: skip
    assert (completed.returncode, completed.stderr) == (0, ""), completed.stdout
    assert completed.stdout.splitlines() == platform_output(parse_size(memory), cpus, APPEND)


@pytest.mark.usefixtures("kvm_required")
def test_platform_kernel_through_the_firmware(pyvmm_cli):
    # From the reset vector through pyvmm's firmware: the kernel finds the same platform.
    completed = pyvmm_cli(
        "run", str(PLATFORM), "--firmware", "--cpus", "4", "--memory", "5G", "--append", APPEND,
        "--timeout", str(TIMEOUT),
    )  # fmt: skip
    assert (completed.returncode, completed.stderr) == (0, ""), completed.stdout
    assert completed.stdout.splitlines() == platform_output(5 * GIB, 4, APPEND)


@pytest.mark.usefixtures("kvm_required")
def test_platform_kernel_without_append(pyvmm_cli):
    # The command line item is then empty (a NUL), and the multiboot one ends in a space.
    completed = pyvmm_cli("run", "mb_platform", "--timeout", str(TIMEOUT))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.splitlines() == platform_output(64 * MIB, 1, "")


def legacy_and_dma_exits(append: str, e820_size: int) -> tuple[int, int]:
    """Port exits mb_platform makes to fw_cfg's data port and its DMA register.

    Legacy: a selection plus a byte read per byte, for the signature and ID (4 bytes each) and
    for every item read both ways (RAM size 8, CPU counts 2 and 2, command line size 4 and its
    data, etc/e820). DMA: two for the signature, two per transfer: the six items read both
    ways, then the directory's count and its one entry.
    """
    both = [8, 2, 2, 4, len(append) + 1, e820_size]
    legacy = 2 * (1 + 4) + sum(1 + n for n in both)
    dma = 2 + 2 * (len(both) + 2)
    return legacy, dma


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(("cpus", "memory"), [(2, "64M"), (4, "5G")])
def test_platform_kernel_api(cpus, memory):
    with Machine(memory=memory, cpus=cpus, serial="capture") as machine:
        machine.load(PLATFORM, append=APPEND)
        device = machine.fw_cfg
        assert device.item(fc.FW_CFG_CMDLINE_DATA) == APPEND.encode() + b"\0"
        result = machine.run(timeout=TIMEOUT)
        size = machine.memory.size
    assert (result.outcome, result.exit_status) == ("exit", 0), result.serial_text
    assert result.serial_text.splitlines() == platform_output(size, cpus, APPEND)
    assert result.unclaimed_pio.count == 0 and result.unclaimed_mmio.count == 0
    hits = {name: count for _, name, _, count, _ in result.range_hits}
    e820_size = len(device.item(fc.FW_CFG_FILE_FIRST))
    assert (hits["fw_cfg"], hits["fw_cfg-dma"]) == legacy_and_dma_exits(APPEND, e820_size)


@pytest.mark.usefixtures("kvm_required")
def test_platform_kernel_notices_a_command_line_that_differs():
    with Machine(serial="capture") as machine:
        machine.load(PLATFORM, append=APPEND)
        machine.fw_cfg.set_cmdline(APPEND + " extra")
        result = machine.run(timeout=TIMEOUT)
    assert result.exit_status == 4 << 1 | 1, result.serial_text  # F_CMDLINE
    assert result.serial_text.splitlines()[-1] == (
        "FAIL: fw_cfg cmdline ends the multiboot command line (got 0x0, want 0x1)"
    )


@pytest.mark.usefixtures("kvm_required")
def test_platform_kernel_notices_a_wrong_cmos_memory_field():
    with Machine(serial="capture") as machine:
        machine.load(PLATFORM)
        machine.cmos.ram[0x34] += 1  # 64 KiB units above 16 MiB
        result = machine.run(timeout=TIMEOUT)
    assert result.exit_status == 6 << 1 | 1, result.serial_text  # F_CMOS
    assert result.serial_text.splitlines()[-1] == (
        "FAIL: cmos 0x34 (64 KiB above 16 MiB) (got 0x301, want 0x300)"
    )


# ---- mb_timers ---------------------------------------------------------------------------


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    ("cpus", "path"), [(1, []), (2, []), (1, ["--firmware"])], ids=["1cpu", "2cpus", "firmware"]
)
def test_timers_kernel_cli(pyvmm_cli, cpus, path):
    # With 2 vCPUs the AP waits for INIT/SIPI that never comes: only vCPU 0 takes interrupts.
    completed = pyvmm_cli(
        "run", "mb_timers", *path, "--cpus", str(cpus), "--timeout", str(TIMEOUT)
    )  # fmt: skip
    assert (completed.returncode, completed.stderr) == (0, ""), completed.stdout
    assert completed.stdout.splitlines() == timers_output()


@pytest.mark.usefixtures("kvm_required")
def test_timers_kernel_api_uart_bytes_leave_by_interrupt():
    with Machine(serial="capture") as machine:
        machine.load(TIMERS)
        result = machine.run(timeout=TIMEOUT)
    assert (result.outcome, result.exit_status) == ("exit", 0), result.serial_text
    assert result.serial_text.splitlines() == timers_output()
    assert result.unclaimed_pio.count == 0 and result.unclaimed_mmio.count == 0


@pytest.mark.usefixtures("kvm_required")
def test_timers_kernel_follows_the_madt_override(monkeypatch):
    """A MADT whose override sends IRQ 0 to GSI 0: the kernel listens there, and hears nothing,
    since KVM's PIT still reaches IOAPIC pin 2, so the override is what it went by."""
    original = pyvmm.machine.write_firmware_tables

    def tables_with_irq0_at_gsi0(memory, cpus, cpuid) -> int:
        rsdp = original(memory, cpus, cpuid)
        address, madt = build_acpi_tables(cpus, memory.top).tables["APIC"]
        moved = bytearray(madt)
        offset = 44
        while offset < len(moved):
            if moved[offset] == 2 and moved[offset + 3] == 0:  # the override of IRQ 0
                struct.pack_into("<I", moved, offset + 4, 0)
            offset += moved[offset + 1]
        moved[9] = 0
        moved[9] = -sum(moved) & 0xFF
        memory.write(address, bytes(moved))
        return rsdp

    monkeypatch.setattr(pyvmm.machine, "write_firmware_tables", tables_with_irq0_at_gsi0)
    with Machine(serial="capture") as machine:
        machine.load(TIMERS)
        result = machine.run(timeout=TIMEOUT)
    lines = result.serial_text.splitlines()
    assert result.exit_status == 5 << 1 | 1, result.serial_text  # F_PIT
    assert "IRQ 0 -> GSI 0 (flags 0x0)" in lines[0]
    assert lines[-1] == "FAIL: pit interrupts within the timeout (got 0x0, want 0x3)"
