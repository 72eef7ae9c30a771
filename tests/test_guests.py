"""Every bundled test guest, booted on the real /dev/kvm through the Python API."""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
import pytest

from pyvmm import ExitStatus, Machine, guest_path
from pyvmm._native import ffi, lib
from pyvmm.bus import NativeHandler
from pyvmm.errors import DeviceHandlerError


def test_hello_long_mode(run_guest):
    result = run_guest("hello")
    assert (result.outcome, result.exit_status) == ("exit", 0)
    assert result.serial_text == "Hello from a pyvmm guest!\n"
    assert result.registers == ""


def test_hello_protected_mode(run_guest):
    result = run_guest("hello32")
    assert result.exit_status == 0
    assert result.serial_text == "Hello from 32-bit protected mode!\n"


def test_hello_real_mode(run_guest):
    result = run_guest("hello16", mode="real")
    assert result.exit_status == 0
    assert result.serial_text == "Hello from real mode!\n"


class InvertingRegisters:
    """Port registers that answer reads with the bitwise inverse of what was written."""

    def __init__(self, size: int) -> None:
        self.bytes = bytearray(size)
        self.calls = 0

    def __call__(self, offset: int, data: memoryview, is_write: bool) -> None:
        self.calls += 1
        if is_write:
            self.bytes[offset : offset + len(data)] = data
        else:
            data[:] = bytes(~b & 0xFF for b in self.bytes[offset : offset + len(data)])


class StringPort:
    """A byte port that records writes and reads them back upper-cased."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.read_index = 0

    def __call__(self, offset: int, data: memoryview, is_write: bool) -> None:
        assert len(data) == 1
        if is_write:
            self.written += data
        else:
            data[0] = self.written.upper()[self.read_index]
            self.read_index += 1


class MemoryWindow:
    """MMIO registers that read back what was written, counting accesses by width."""

    def __init__(self, size: int) -> None:
        self.bytes = bytearray(size)
        self.widths: list[tuple[str, int]] = []

    def __call__(self, offset: int, data: memoryview, is_write: bool) -> None:
        self.widths.append(("w" if is_write else "r", len(data)))
        if is_write:
            self.bytes[offset : offset + len(data)] = data
        else:
            data[:] = self.bytes[offset : offset + len(data)]


def test_port_io_and_mmio_exerciser(run_guest):
    registers, string_port, window = InvertingRegisters(8), StringPort(), MemoryWindow(16)
    backing = os.memfd_create("fd-window")
    os.pwrite(backing, struct.pack("<II", 0, 0x600DCAFE), 0)

    def setup(machine: Machine) -> None:
        machine.add_pio(0x500, 8, registers, "registers")
        machine.add_pio(0x508, 1, string_port, "string port")
        machine.add_mmio(0xD000_0000, 16, window, "window")
        machine.forward_mmio(0xD000_1000, 8, backing)

    try:
        result = run_guest("pio_mmio", setup=setup)
        fd_contents = os.pread(backing, 8, 0)
    finally:
        os.close(backing)
    assert result.exit_status == 0, result.message
    assert result.serial_text.splitlines() == [
        "pio ee ddcc bbaa9988",
        "pio-str 5059564d4d",
        "mmio a1 b2c3 d4e5f607 0123456789abcdef",
        "fd cafef00d 600dcafe",
        "done",
    ]
    assert string_port.written == b"pyvmm"
    assert window.widths == [
        ("w", 1),
        ("w", 2),
        ("w", 4),
        ("w", 8),
        ("r", 1),
        ("r", 2),
        ("r", 4),
        ("r", 8),
    ]
    # The fd-forwarded window was served natively: the guest's write reached the file.
    assert fd_contents == struct.pack("<II", 0xCAFEF00D, 0x600DCAFE)
    assert result.unclaimed_pio.count == 0 and result.unclaimed_mmio.count == 0
    assert 0 < result.python_exits < result.exits


def test_exerciser_served_natively_never_enters_python(run_guest):
    buffers = {}
    backing = os.memfd_create("fd-window")
    os.pwrite(backing, struct.pack("<II", 0, 0x600DCAFE), 0)

    def setup(machine: Machine) -> None:
        buffers["registers"] = machine.pio_buffer(0x500, 8)
        buffers["string"] = machine.pio_buffer(0x508, 1)
        buffers["window"] = machine.mmio_buffer(0xD000_0000, 16)
        machine.forward_mmio(0xD000_1000, 8, backing)

    try:
        result = run_guest("pio_mmio", setup=setup)
    finally:
        os.close(backing)
    assert result.exit_status == 0, result.message
    assert result.serial_text.splitlines() == [
        "pio 11 2233 44556677",
        "pio-str 6d6d6d6d6d",  # five writes to one byte register; the last was 'm'
        "mmio a1 b2c3 d4e5f607 0123456789abcdef",
        "fd cafef00d 600dcafe",
        "done",
    ]
    assert buffers["window"].tobytes() == bytes.fromhex("a100c3b207f6e5d4efcdab8967452301")
    assert result.python_exits == 0
    assert result.exits > 20


@pytest.mark.parametrize("cpus", [1, 4])
def test_smp_every_vcpu_reports(run_guest, cpus):
    result = run_guest("smp", cpus=cpus)
    assert result.exit_status == 0, result.message
    lines = result.serial_text.splitlines()
    assert sorted(lines[:-1]) == [f"cpu {i} of {cpus} online" for i in range(cpus)]
    assert lines[-1] == f"all {cpus} cpus reported"


def test_mtrr_default_type_is_write_back_on_every_vcpu(kvm_required):
    # Once DMA is non-coherent KVM honours guest MTRRs; the reset value would mean uncached.
    with Machine(serial="capture", cpus=3) as machine:
        machine.load(guest_path("smp"))
        assert machine.run(timeout=60).exit_status == 0
        assert [v.get_msrs([0x2FF]) for v in machine.vcpus] == [{0x2FF: 0xC06}] * 3


def test_serial_input(kvm_required):
    with Machine(serial="capture") as machine:
        machine.load(guest_path("echo"))
        machine.serial.push_input(b"hello, guest\n")
        result = machine.run(timeout=60)
    assert result.serial_text == "type a line\ngot: hello, guest\n"


def test_triple_fault(run_guest):
    result = run_guest("triple_fault")
    assert result.outcome == "triple-fault"
    assert result.exit_status == ExitStatus.TRIPLE_FAULT
    assert result.message == "vCPU 0 triple-faulted"
    assert "rip=" in result.registers and "cr3=" in result.registers
    assert result.serial_text == "about to triple-fault\n"


def test_unclaimed_mmio_reads_ones_and_is_counted(run_guest):
    result = run_guest("unclaimed_mmio")
    assert result.exit_status == (2 << 1) | 1
    assert result.serial_text.splitlines() == ["touching unclaimed MMIO", "read ffffffff"]
    assert result.unclaimed_mmio.count == 2
    assert result.unclaimed_mmio.last_address == 0xE000_0000
    assert result.unclaimed_mmio.last_is_write


def test_unclaimed_mmio_fatal_when_asked(run_guest):
    result = run_guest("unclaimed_mmio", fail_on_unclaimed=True)
    assert result.exit_status == ExitStatus.UNCLAIMED_ACCESS
    assert result.message == (
        "vCPU 0: unclaimed MMIO read of 4 bytes at 0xe0000000 (--fail-on-unclaimed)"
    )
    assert "rip=" in result.registers


def test_halt_with_interrupts_on_and_no_irqchip(run_guest):
    result = run_guest("wait_irq")
    assert result.exit_status == ExitStatus.HALTED_FOREVER
    assert "nothing can wake it" in result.message


def test_cli_and_halt_ends_a_multi_vcpu_guest_with_zero(run_guest):
    # hello halts every vCPU but 0 with interrupts off; vCPU 0 powers off.
    result = run_guest("hello", cpus=3)
    assert result.exit_status == 0
    assert result.serial_text == "Hello from a pyvmm guest!\n"


def test_in_kernel_irqchip_keeps_hlt_in_the_kernel(run_guest):
    result = run_guest("wait_irq", irqchip=True, timeout=1)
    assert result.outcome == "timeout"
    assert result.exit_status == ExitStatus.TIMEOUT


def test_python_handler_exception_reaches_the_caller(kvm_required):
    def broken(offset: int, data: memoryview, is_write: bool) -> None:
        raise RuntimeError("device bug")

    with Machine(serial="capture") as machine:
        machine.load(guest_path("pio_mmio"))
        machine.add_pio(0x500, 8, broken, "broken device")
        with pytest.raises(DeviceHandlerError, match=r"broken device.*device bug") as raised:
            machine.run(timeout=30)
    assert raised.value.exit_status == ExitStatus.DEVICE_ERROR
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_smp_with_in_kernel_irqchip_starts_every_vcpu_without_sipi(run_guest):
    # With an in-kernel LAPIC, KVM parks APs waiting for INIT/SIPI unless pyvmm makes them
    # runnable; every vCPU must still report in.
    result = run_guest("smp", cpus=3, irqchip=True, timeout=60)
    assert result.exit_status == 0, result.message
    assert result.serial_text.splitlines()[-1] == "all 3 cpus reported"


def test_uart_input_raises_irq4_through_the_in_kernel_pic(kvm_required):
    with Machine(serial="capture", irqchip=True) as machine:
        machine.load(guest_path("uart_irq"))
        # Input arrives while the guest sits in HLT with interrupts on: only IRQ 4 wakes it.
        typing = threading.Timer(0.5, machine.serial.push_input, (b"z",))
        typing.start()
        try:
            result = machine.run(timeout=60)
        finally:
            typing.cancel()
    assert result.exit_status == 0, result.message
    assert result.serial_text == "waiting for input on IRQ 4\nirq 4 delivered 'z'\n"


def test_msix_window_table_sharing_a_page_is_served_in_c(run_guest):
    """An MSI-X table at offset 4 of a trapped window: table bytes are the VMM's (a write is
    handed to Python once, to update routes), the registers around it go to the device fd."""
    device = os.memfd_create("device-bar")
    os.pwrite(device, bytes(16), 0)
    table = np.zeros(16, dtype=np.uint8)
    notified: list[tuple[int, bytes]] = []
    keep = {}

    def on_table_write(offset: int, data: memoryview, is_write: bool) -> None:
        notified.append((offset, bytes(data)))

    def setup(machine: Machine) -> None:
        machine.pio_buffer(0x500, 8)
        machine.pio_buffer(0x508, 1)
        window = ffi.new(
            "struct pyvmm_msix_window *",
            {"table_offset": 4, "table_size": 16, "table": ffi.from_buffer(table)},
        )
        keep["window"] = window
        handler = NativeHandler(
            lib.PYVMM_HANDLER_MSIX, fd=device, device=window, keep=window, python=on_table_write
        )
        machine.mmio.add(0xD000_0000, 0x1000, handler, "MSI-X window")
        machine.mmio_buffer(0xD000_1000, 8)

    try:
        result = run_guest("pio_mmio", setup=setup)
        registers = os.pread(device, 4, 0)
    finally:
        os.close(device)
    assert result.exit_status == 0, result.message
    assert "mmio a1 b2c3 d4e5f607 0123456789abcdef" in result.serial_text
    assert registers == bytes.fromhex("a100c3b2"), "bytes 0-3 went to the device fd"
    assert table.tobytes() == bytes.fromhex("07f6e5d4efcdab896745230100000000")
    assert notified == [(4, bytes.fromhex("07f6e5d4")), (8, bytes.fromhex("efcdab8967452301"))]
    assert result.python_exits == 2, "only the two table writes reached Python"
