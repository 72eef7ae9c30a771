"""QEMU's pc-testdev (hw/misc/pc-testdev.c): its ports and window, and the guest's view.

The host tests drive the device's handlers directly; the guest test runs mb_pc_testdev under
QEMU (the reference) and pyvmm with `-device pc-testdev` and compares output and status.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyvmm import guest_path
from pyvmm.bus import Bus
from pyvmm.devices.options import parse_device_option
from pyvmm.devices.pc_testdev import IRQ_LINE_PORT, PcTestdev
from pyvmm.errors import ConfigurationError
from pyvmm.memory import GuestMemory


@pytest.fixture
def device():
    memory = GuestMemory("4M")
    lines: list[tuple[int, int]] = []
    testdev = PcTestdev(memory, lambda line, level: lines.append((line, level)))
    pio, mmio = Bus("port I/O", 1 << 16), Bus("MMIO", 1 << 48)
    testdev.attach(pio, mmio)
    testdev.lines = lines
    testdev.pio = pio
    yield testdev
    memory.close()


def access(device, port: int, value: int = 0, size: int = 1, write: bool = False) -> int:
    claimed = device.pio.find(port)
    data = memoryview(bytearray(value.to_bytes(size, "little")))
    claimed.handler(port - claimed.base, data, write)
    return int.from_bytes(data, "little")


def test_no_properties_and_a_one_line_error_for_one():
    assert parse_device_option("pc-testdev").properties == {}
    with pytest.raises(ConfigurationError, match=r"no property 'iobase' \(it has none\)"):
        parse_device_option("pc-testdev,iobase=0xe0")


def test_scratch_register_is_shared_by_both_windows_at_any_width(device):
    access(device, 0xE0, 0x11223344, 4, write=True)
    assert access(device, 0xE8, size=4) == 0x11223344
    access(device, 0xEA, 0xBEEF, 2, write=True)
    assert access(device, 0xE0, size=4) == 0xBEEF3344
    assert access(device, 0xE9) == 0x33
    assert access(device, 0xE3) == 0xBE


def test_irq_line_ports_take_byte_writes_of_any_nonzero_as_high(device):
    access(device, IRQ_LINE_PORT + 4, 0x80, write=True)
    access(device, IRQ_LINE_PORT + 4, 0, write=True)
    access(device, IRQ_LINE_PORT + 23, 1, write=True)
    access(device, IRQ_LINE_PORT + 5, 1, 2, write=True)  # QEMU refuses wider writes
    assert device.lines == [(4, 1), (4, 0), (23, 1)]
    assert access(device, IRQ_LINE_PORT + 4, size=4) == 0  # write-only: reads 0, as in QEMU
    assert access(device, 0xE4, size=2) == 0


def test_flush_port_keeps_the_page_contents(device):
    device.memory.write(0x3000, b"kept")
    access(device, 0xE4, 0x3123, 4, write=True)
    access(device, 0xE4, 0x5000, 2, write=True)  # 32-bit writes only
    access(device, 0xE4, 0x7FFFF000, 4, write=True)  # not RAM
    assert device.flushed == [0x3000]
    assert device.memory.read(0x3000, 4) == b"kept"


def test_iomem_window_is_64k_at_ff000000(device):
    assert device.iomem.size == 0x10000
    assert device.pio.find(0x2018) is None


GUEST_DEVICES = ["pc-testdev", "isa-debug-exit,iobase=0xf4,iosize=4"]
TIMEOUT = 60


def run_qemu() -> subprocess.CompletedProcess:
    devices = [word for device in GUEST_DEVICES for word in ("-device", device)]
    command = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", "-cpu",
        "host,-arch-capabilities", "-m", "64M", "-display", "none", "-serial", "stdio",
        "-no-reboot", *devices, "-kernel", str(guest_path("mb_pc_testdev")),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.usefixtures("kvm_required")
def test_guest_sees_what_it_sees_under_qemu(pyvmm_cli):
    devices = [word for device in GUEST_DEVICES for word in ("--device", device)]
    ours = pyvmm_cli(
        "run", "mb_pc_testdev", *devices, "--timeout", str(TIMEOUT), timeout=TIMEOUT + 30
    )
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert ours.stdout.endswith("mb_pc_testdev: all ok\n")
    assert "Traceback" not in ours.stderr
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("no qemu-system-x86_64 to compare with (pyvmm's side passed)")
    qemu = run_qemu()
    assert (ours.stdout, ours.returncode) == (qemu.stdout, qemu.returncode), qemu.stderr


@pytest.mark.usefixtures("kvm_required")
def test_a_property_it_lacks_is_one_line_and_status_2(pyvmm_cli):
    ours = pyvmm_cli("run", "mb_pc_testdev", "--device", "pc-testdev,iobase=0xe0", timeout=60)
    assert ours.returncode == 2
    assert ours.stderr.strip().splitlines() == [
        "pyvmm: --device pc-testdev: no property 'iobase' (it has none)"
    ]
