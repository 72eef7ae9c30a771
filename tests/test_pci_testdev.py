"""QEMU's pci-testdev (hw/misc/pci-testdev.c): configuration space, BARs, test registers.

The host tests drive the function directly; the guest test runs mb_pci_testdev under QEMU
(the reference) and pyvmm with the same `-device pci-testdev[,membar=N]` and compares.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from pyvmm import guest_path
from pyvmm.bus import Bus
from pyvmm.devices.options import parse_device_option
from pyvmm.devices.pci_testdev import PciTestdev
from pyvmm.errors import ConfigurationError
from pyvmm.pci.config import BAR0, COMMAND

TIMEOUT = 60
MEMORY_BAR, IO_BAR = 0xC000_0000, 0xC100


@pytest.fixture
def function():
    pio, mmio = Bus("port I/O", 1 << 16), Bus("MMIO", 1 << 48)
    testdev = PciTestdev(pio, mmio, MEMORY_BAR, IO_BAR, 0x1_0000_0000, 1 << 20)
    testdev.config_write(COMMAND, 2, 0x3)
    return testdev


def access(bus: Bus, address: int, value: int = 0, size: int = 1, write: bool = False) -> int:
    claimed = bus.find(address)
    assert claimed is not None, f"{address:#x} is not decoded"
    data = memoryview(bytearray(value.to_bytes(size, "little")))
    claimed.handler(address - claimed.base, data, write)
    return int.from_bytes(data, "little")


def test_membar_is_its_one_property():
    assert parse_device_option("pci-testdev").properties == {"membar": 0}
    assert parse_device_option("pci-testdev,membar=1048576").properties == {"membar": 1 << 20}


@pytest.mark.parametrize(
    ("text", "size"),
    [("1M", 1 << 20), ("1m", 1 << 20), ("1024K", 1 << 20), ("0x100000", 1 << 20),
     ("1.5M", 3 << 19), ("2G", 2 << 30), ("010", 10), ("4096B", 4096)],
)  # fmt: skip
def test_membar_takes_qemus_size_spellings(text, size):
    # As qemu_strtosz reads them (checked against QEMU 7.2): no octal, 1024-based suffixes.
    assert parse_device_option(f"pci-testdev,membar={text}").properties["membar"] == size


@pytest.mark.parametrize("text", ["1.5", "zz", "1Q", ""])
def test_a_bad_size_names_the_problem(text):
    with pytest.raises(ConfigurationError, match=f"membar='{text}' is not a size"):
        parse_device_option(f"pci-testdev,membar={text}")


def test_identity_and_bar_sizing(function):
    assert function.config_read(0, 4) == 0x0005_1B36
    assert function.config_read(0x08, 4) == 0x00FF_0000
    assert function.config_read(0x2C, 4) == 0x1100_1AF4
    assert function.config_read(0x3D, 1) == 0
    sizes = []
    for index in range(6):
        offset = BAR0 + 4 * index
        saved = function.config_read(offset, 4)
        function.config_write(offset, 4, 0xFFFF_FFFF)
        sizes.append(function.config_read(offset, 4))
        function.config_write(offset, 4, saved)
    assert sizes == [0xFFFF_F000, 0xFFFF_FF01, 0xFFF0_000C, 0xFFFF_FFFF, 0, 0]
    assert function.config_read(BAR0 + 8, 4) == 0x0000_000C
    assert function.config_read(BAR0 + 12, 4) == 1


def test_tests_count_bytes_at_their_offset(function):
    access(function.mmio, MEMORY_BAR, 2, write=True)  # mmio-datamatch-eventfd
    assert access(function.mmio, MEMORY_BAR + 4, size=4) == 0x802
    for _ in range(3):
        access(function.mmio, MEMORY_BAR + 0x802, 0xFA, write=True)
    access(function.mmio, MEMORY_BAR + 0x802, 0x05, write=True)  # other data: not counted
    assert access(function.pio, IO_BAR + 12, size=4) == 3  # either BAR reads the header
    name = bytes(access(function.pio, IO_BAR + 16 + i) for i in range(23))
    assert name == b"mmio-datamatch-eventfd\0"
    access(function.pio, IO_BAR, 1, size=4, write=True)  # portio-wildcard-eventfd, bytewise
    assert access(function.pio, IO_BAR, size=2) == 0x0104
    access(function.pio, IO_BAR + 0x84, 0x1234, size=2, write=True)  # its first byte counts
    assert access(function.pio, IO_BAR + 12, size=4) == 1
    access(function.pio, IO_BAR, 3, write=True)
    assert access(function.pio, IO_BAR, size=4) == 0  # no test: reads 0
    access(function.mmio, 0x1_0000_0000, 0xFFFF, size=2, write=True)
    assert access(function.mmio, 0x1_0000_0000, size=8) == 0  # membar: empty, as QEMU's


def test_decoding_follows_the_command_register_and_the_bars(function):
    function.config_write(COMMAND, 2, 0x1)
    assert function.mmio.find(MEMORY_BAR) is None and function.pio.find(IO_BAR)
    function.config_write(BAR0 + 4, 4, 0xD001)
    assert function.pio.find(IO_BAR) is None and function.pio.find(0xD000)
    function.config_write(COMMAND, 2, 0x0)
    assert function.pio.find(0xD000) is None


@pytest.mark.usefixtures("kvm_required")
def test_eventfd_tests_arm_a_kvm_ioeventfd_where_the_bar_decodes():
    from pyvmm.machine import Machine

    with Machine(serial="capture") as machine:
        machine.add_device("pci-testdev")
        function = machine.pci.functions[1]
        base = function.config_read(BAR0, 4)
        function.config_write(COMMAND, 2, 0x3)
        access(function.mmio, base, 2, write=True)  # mmio-datamatch-eventfd
        assert function._armed == (base + 0x802, 1, False, 0xFA)
        function.config_write(COMMAND, 2, 0x1)  # memory decoding off: nowhere to catch
        assert function._armed is None
        function.config_write(COMMAND, 2, 0x3)
        access(function.mmio, base, 0, write=True)  # mmio-no-eventfd: plain counting
        assert function._armed is None
        eventfd = function.eventfd
    assert function.eventfd == -1
    with pytest.raises(OSError):
        os.fstat(eventfd)


def run_qemu(device: str) -> subprocess.CompletedProcess:
    command = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", "-cpu",
        "host,-arch-capabilities", "-m", "64M", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-device", device, "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel", str(guest_path("mb_pci_testdev")),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize("device", ["pci-testdev", "pci-testdev,membar=1M"])
def test_guest_sees_what_it_sees_under_qemu(pyvmm_cli, device):
    ours = pyvmm_cli(
        "run", "mb_pci_testdev", "--device", device, "--timeout", str(TIMEOUT),
        timeout=TIMEOUT + 30,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert ours.stdout.endswith("mb_pci_testdev: all ok\n")
    assert ("bar 2: memory, 64-bit, prefetchable, 0x100000 bytes" in ours.stdout) is (
        "membar" in device
    )
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("no qemu-system-x86_64 to compare with (pyvmm's side passed)")
    qemu = run_qemu(device)
    assert (ours.stdout, ours.returncode) == (qemu.stdout, qemu.returncode), qemu.stderr


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    ("device", "line"),
    [
        ("pci-testdev,size=4", "no property 'size' (it has membar)"),
        ("pci-testdev,membar=0x3000", "membar=0x3000 is not a power of 2"),
    ],
)
def test_bad_properties_are_one_line_and_status_2(pyvmm_cli, device, line):
    ours = pyvmm_cli("run", "mb_pci_testdev", "--device", device, timeout=60)
    assert ours.returncode == 2
    assert ours.stderr.strip().splitlines() == [f"pyvmm: --device pci-testdev: {line}"]
