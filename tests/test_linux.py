"""The Linux boot protocol's loader on synthetic bzImages: what lands in the zero page, and
the one-line refusals. (Booting a real kernel needs hardware KVM: tests/test_rig_linux.py.)
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.boot import BootProtocol, load_guest
from pyvmm.errors import ExitStatus, GuestImageError
from pyvmm.linux import (
    BOOT_CS,
    BOOT_DS,
    COMMAND_LINE,
    E820_ENTRIES,
    E820_TABLE,
    KERNEL_LOAD_ADDRESS,
    LINUX_GDT,
    ZERO_PAGE,
    is_bzimage,
    load_linux,
)
from pyvmm.memory import GuestMemory

SETUP_SECTS = 4


def bzimage(
    *,
    version: int = 0x020F,
    xloadflags: int = 1,
    kernel: bytes = b"\x90" * 4096,
    init_size: int = 1 << 20,
    initrd_addr_max: int = 0x7FFFFFFF,
    cmdline_size: int = 2047,
) -> bytes:
    """A bzImage's boot sector and setup header, then a stand-in protected-mode kernel."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    setup[0x1F1] = SETUP_SECTS
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x6A  # the header runs to 0x26C
    struct.pack_into("<IH", setup, 0x202, 0x53726448, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + kernel


@pytest.fixture
def memory():
    memory = GuestMemory("64M")
    yield memory
    memory.close()


def test_zero_page_kernel_command_line_and_initrd(tmp_path: Path, memory) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"cpio" * 1000)
    assert is_bzimage(image.read_bytes())
    loaded = load_linux(memory, image, "console=ttyS0 quiet", initrd)
    assert loaded.entry == KERNEL_LOAD_ADDRESS + 0x200 and loaded.zero_page == ZERO_PAGE
    assert memory.read(KERNEL_LOAD_ADDRESS, 4096) == b"\x90" * 4096
    page = memory.read(ZERO_PAGE, 4096)
    assert page[0x202:0x206] == b"HdrS", "the setup header was copied"
    assert page[0x210] == 0xFF and page[0x211] & 0x81 == 0x81  # loader type, LOADED_HIGH|heap
    assert struct.unpack_from("<I", page, 0x228)[0] == COMMAND_LINE
    assert memory.read(COMMAND_LINE, 20) == b"console=ttyS0 quiet\0"
    address, size = struct.unpack_from("<II", page, 0x218)
    assert (address, size) == loaded.initrd and size == 4000
    assert address % 4096 == 0 and address + size <= 64 << 20
    assert memory.read(address, 4) == b"cpio"
    entries = [
        struct.unpack_from("<QQI", page, E820_TABLE + 20 * i) for i in range(page[E820_ENTRIES])
    ]
    assert entries[0] == (0, 0x9FC00, 1) and (1 << 20, 63 << 20, 1) in entries
    gdt = struct.unpack_from("<4Q", memory.read(LINUX_GDT, 32))
    assert gdt[BOOT_CS // 8] == 0x00AF9B000000FFFF and gdt[BOOT_DS // 8] == 0x00CF93000000FFFF


def test_the_image_picks_the_linux_protocol(tmp_path: Path, memory) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage())
    plan = load_guest(memory, image, append="quiet")
    assert plan.protocol is BootProtocol.LINUX and plan.boot_cpu_only
    assert plan.registers == {"rsi": ZERO_PAGE} and plan.enter is not None


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (bzimage()[:0x100], "not a bzImage"),
        (bzimage(version=0x020A), "older than 2.12"),
        (bzimage(xloadflags=0), "no 64-bit entry point"),
        (bzimage(kernel=b""), "truncated"),
        (bzimage(init_size=128 << 20), "needs at least 130 MiB of RAM"),
    ],
)
def test_malformed_images_are_refused(tmp_path: Path, memory, image: bytes, words: str) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    with pytest.raises(GuestImageError, match=words):
        load_linux(memory, path, "")


def test_initrd_that_does_not_fit_and_a_long_command_line(tmp_path: Path, memory) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(init_size=60 << 20, cmdline_size=16))
    big = tmp_path / "initrd"
    big.write_bytes(bytes(8 << 20))
    with pytest.raises(GuestImageError, match="does not fit"):
        load_linux(memory, path, "", big)
    with pytest.raises(GuestImageError, match="takes at most 16"):
        load_linux(memory, path, "x" * 17)


def test_the_cli_refuses_a_bad_bzimage_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(xloadflags=0))
    done = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(path), "--boot", "linux"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == ExitStatus.BAD_IMAGE
    assert done.stderr.count("\n") == 1 and "64-bit entry point" in done.stderr
