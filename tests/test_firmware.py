"""pyvmm's own firmware (firmware/, pyvmm/firmware.py) on the real /dev/kvm: guests booted from
the reset vector print what they print on the direct path; each boot protocol's kernel is
entered with the same registers, CPU state and RAM; the APs of pyvmm's ELF ABI wait in the
firmware; a missing or corrupt image, or a boot the firmware cannot find, ends in one line.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pyvmm import ExitStatus, Machine, guest_path
from pyvmm.errors import ConfigurationError, GuestImageError
from pyvmm.firmware import (
    BOOT_FILE,
    BUNDLED_IMAGE,
    RECORD,
    ROM_BASE,
    ROM_SIZE,
    SIGNATURE_OFFSET,
    Firmware,
    read_image,
)
from pyvmm.memory import MIB
from tests.test_linux import bzimage
from tests.test_loader import elf64
from tests.test_multiboot import elf32, header

pytestmark = pytest.mark.usefixtures("kvm_required")
TIMEOUT = 60
GREETING = "Hello from a pyvmm guest!\n"
#: out %al, $0x99: an unclaimed port, so that with fail_on_unclaimed the run stops right at
#: the kernel's first instruction, with the entry state still in the vCPU (16/32/64-bit).
STOP = b"\xe6\x99"

REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags",
             *(f"r{n}" for n in range(8, 16)))  # fmt: skip
SEGMENT_FIELDS = ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g")
#: What the firmware leaves behind that a direct boot does not: its data in the boot page
#: after the GDT and, when it enters protected mode, the page tables it used itself.
FIRMWARE_DATA = (0x1020, 0x2000)
FIRMWARE_PAGE_TABLES = (0x2000, 0x8000)
PAGE_ACCESSED_DIRTY = 0x60


def run(guest: str | Path, firmware: bool, **options) -> tuple[object, Machine]:
    """Boot guest on a fresh machine; returns the result (the machine is closed)."""
    load = {key: options.pop(key) for key in ("append", "initrd", "mode") if key in options}
    with Machine(serial="capture", firmware=firmware, **options) as machine:
        machine.load(guest_path(str(guest)), **load)
        return machine.run(timeout=TIMEOUT), machine


def test_hello_boots_through_the_firmware(record_property) -> None:
    direct, _ = run("hello", False)
    result, machine = run("hello", True)
    assert (result.exit_status, result.serial_text) == (0, GREETING), result.registers
    assert machine.firmware.path == BUNDLED_IMAGE
    # The firmware's own exits: the DMA signature, the directory, the record, one per blob.
    assert 0 < result.exits - direct.exits < 20
    record_property("hello_exits_direct", direct.exits)
    record_property("hello_exits_firmware", result.exits)
    print(f"\nhello: {direct.exits} exits direct, {result.exits} through the firmware")


@pytest.fixture
def modules(tmp_path: Path) -> list[str]:
    first = tmp_path / "first.txt"
    first.write_text("the first module\nsecond line\n")
    second = tmp_path / "second.bin"
    second.write_bytes(bytes(range(256)) * 40 + b"tail")
    return [f"{first} arg1 arg2", str(second)]


def test_multiboot_info_prints_the_same_through_the_firmware(modules, record_property) -> None:
    options = {"append": "console=ttyS0 a=b", "initrd": modules, "cpus": 2}
    direct, _ = run("multiboot_info", False, **options)
    result, _ = run("multiboot_info", True, **options)
    assert direct.exit_status == 0, direct.serial_text
    assert result.exit_status == 0, result.serial_text + result.registers
    assert result.serial_text == direct.serial_text
    assert "mods 2" in result.serial_text and "layout ok" in result.serial_text
    record_property("multiboot_info_exits_direct", direct.exits)
    record_property("multiboot_info_exits_firmware", result.exits)
    print(f"\nmultiboot_info: {direct.exits} exits direct, {result.exits} through the firmware")


def test_cli_boots_a_multiboot_kernel_through_the_firmware(pyvmm_cli, modules) -> None:
    args = ["--append", "x y", "--initrd", ",".join(modules)]
    direct = pyvmm_cli("run", "multiboot_info", *args)
    # "--firmware KERNEL" with nothing after it: the bundled firmware boots KERNEL.
    bundled = pyvmm_cli("run", "--firmware", "multiboot_info", *args)
    assert direct.returncode == bundled.returncode == 0, bundled.stderr
    assert bundled.stdout == direct.stdout and bundled.stderr == ""
    assert "layout ok" in bundled.stdout


def test_cli_takes_a_firmware_path(pyvmm_cli, tmp_path: Path) -> None:
    image = shutil.copy(BUNDLED_IMAGE, tmp_path / "fw.bin")
    for args in (["--firmware", str(image), "hello"], ["hello", f"--firmware={image}"]):
        done = pyvmm_cli("run", *args)
        assert (done.returncode, done.stdout, done.stderr) == (0, GREETING, ""), args


def test_elf32_and_the_aps_of_the_elf_abi() -> None:
    result, _ = run("hello32", True)
    assert result.exit_status == 0 and result.serial_text == "Hello from 32-bit protected mode!\n"
    # Every vCPU runs the firmware from reset; the others wait for vCPU 0's "go" and enter
    # with their index in RDI, as on the direct path. With an in-kernel irqchip too.
    for irqchip in (False, True):
        result, _ = run("smp", True, cpus=4, irqchip=irqchip)
        assert result.exit_status == 0, result.serial_text + result.registers
        assert "all 4 cpus reported" in result.serial_text


def test_multiboot_aps_are_left_to_the_kernel() -> None:
    direct, _ = run("multiboot_smp", False, cpus=3)
    result, _ = run("multiboot_smp", True, cpus=3)
    assert result.exit_status == 0, result.serial_text + result.registers
    assert result.serial_text == direct.serial_text


# ---- the entry state, protocol by protocol ------------------------------------------------
def stopped_at_entry(path: Path, firmware: bool, **options) -> tuple[dict, np.ndarray]:
    """Boot a kernel whose first instruction stops the run; its CPU state and low RAM."""
    load = {key: options.pop(key) for key in ("append", "initrd") if key in options}
    with Machine(
        memory="32M", serial="capture", fail_on_unclaimed=True, firmware=firmware, **options
    ) as machine:
        machine.load(path, **load)
        result = machine.run(timeout=TIMEOUT)
        assert result.outcome == "unclaimed", f"{result.message}\n{result.registers}"
        assert result.unclaimed_pio.last_address == 0x99
        regs, sregs = machine.vcpus[0].get_regs(), machine.vcpus[0].get_sregs()
        state = {name: getattr(regs, name) for name in REGISTERS}
        for name in ("cr0", "cr3", "cr4", "efer"):
            state[name] = getattr(sregs, name)
        for segment in ("cs", "ds", "es", "fs", "gs", "ss"):
            for field in SEGMENT_FIELDS:
                state[f"{segment}.{field}"] = getattr(getattr(sregs, segment), field)
        for table in ("gdt", "idt"):
            state[f"{table}.base"] = getattr(sregs, table).base
            state[f"{table}.limit"] = getattr(sregs, table).limit
        ram = machine.memory.view(0, machine.memory.regions[0].size).copy()
    return state, ram


def aout_kernel(path: Path) -> Path:
    """A flat multiboot kernel at 1 MiB (a.out kludge): its header, then STOP."""
    fields = (MIB, MIB, 0, MIB + 0x1000, MIB + 32)  # bss to 1 MiB + 4 KiB
    path.write_bytes(header(0x10003, fields) + STOP)
    return path


KERNELS = {
    "elf64": lambda tmp: elf64(tmp / "k.elf", [(MIB, STOP, 0x3000)], MIB),
    "elf32": lambda tmp: elf32(tmp / "k32.elf", MIB, STOP, 0x2000, MIB),
    "multiboot": lambda tmp: aout_kernel(tmp / "mb.bin"),
    "linux": lambda tmp: _write(tmp / "bzImage", bzimage(kernel=bytes(0x200) + STOP)),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", KERNELS)
def test_the_kernel_is_entered_as_on_the_direct_path(tmp_path: Path, kind: str, modules) -> None:
    kernel = KERNELS[kind](tmp_path)
    options = {"cpus": 2}
    if kind in ("multiboot", "linux"):
        options["append"] = "root=/dev/null quiet"
        options["initrd"] = modules if kind == "multiboot" else [modules[1]]
    direct_state, direct_ram = stopped_at_entry(kernel, False, **options)
    state, ram = stopped_at_entry(kernel, True, **options)
    differ = {name: (hex(direct_state[name]), hex(state[name]))
              for name in state if state[name] != direct_state[name]}  # fmt: skip
    assert not differ, differ
    # The same RAM, but for the firmware's own data (and its page tables, which a
    # protected-mode direct boot does not have).
    skipped = [FIRMWARE_DATA]
    if state["cr0"] & (1 << 31) == 0:
        skipped.append(FIRMWARE_PAGE_TABLES)
    for start, end in skipped:
        direct_ram[start:end] = ram[start:end] = 0
    # Page table entries the firmware used have their accessed and dirty bits set by the CPU.
    start, end = FIRMWARE_PAGE_TABLES
    for tables in (direct_ram, ram):
        tables[start:end].view(np.uint64)[:] &= ~np.uint64(PAGE_ACCESSED_DIRTY)
    if kind == "linux":  # Linux's GDT is at 0x30000; the direct path writes pyvmm's too
        direct_ram[0x1000:0x1020] = ram[0x1000:0x1020] = 0
    changed = np.flatnonzero(direct_ram != ram)
    assert not changed.size, f"RAM differs at {[hex(a) for a in changed[:8]]}"


# ---- what goes wrong -----------------------------------------------------------------------
def corrupt(tmp_path: Path, how: str) -> Path:
    image = bytearray(BUNDLED_IMAGE.read_bytes())
    if how == "truncated":
        image = image[: ROM_SIZE // 2]
    elif how == "signature":
        image[SIGNATURE_OFFSET] ^= 0xFF
    elif how == "checksum":
        image[0x100] ^= 0x01
    path = tmp_path / f"{how}.bin"
    path.write_bytes(bytes(image))
    return path


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("missing", "not found"),
        ("truncated", "is 32768 bytes, not 65536"),
        ("signature", "lacks the signature PYVMMFW"),
        ("checksum", "is corrupt: its bytes do not sum to 0 mod 256"),
    ],
)
def test_a_bad_firmware_image_is_one_line(pyvmm_cli, tmp_path: Path, how: str, words) -> None:
    path = tmp_path / "absent.bin" if how == "missing" else corrupt(tmp_path, how)
    with pytest.raises(GuestImageError, match=words):
        read_image(path)
    done = pyvmm_cli("run", "hello", "--firmware", str(path))
    assert done.returncode == ExitStatus.BAD_IMAGE
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"pyvmm: firmware image {path} ")
    assert words in done.stderr


def test_real_mode_is_refused(pyvmm_cli) -> None:
    done = pyvmm_cli("run", "hello16", "--mode", "real", "--firmware")
    assert done.returncode == ExitStatus.USAGE
    assert done.stderr == (
        "pyvmm: --firmware enters a guest in long or protected mode, not real: boot a "
        "real-mode guest without --firmware\n"
    )
    with Machine(serial="capture", firmware=True) as machine, pytest.raises(ConfigurationError):
        machine.load(guest_path("hello16"), mode="real")


NO_BOOT = "pyvmm firmware: fw_cfg has no etc/pyvmm/boot: nothing to boot\n"
BAD_RECORD = "pyvmm firmware: etc/pyvmm/boot is not a boot record this firmware reads\n"
#: A header that announces 5 blobs, with none after it.
SHORT_RECORD = RECORD.pack(b"PYVMBOOT", 0, 0, 5, 4, 0x1000, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("record", "line"),
    [(None, NO_BOOT), (b"NOTABOOT" + bytes(56), BAD_RECORD), (SHORT_RECORD, BAD_RECORD)],
)
def test_the_firmware_says_why_it_cannot_boot(monkeypatch, record: bytes | None, line) -> None:
    # Publish no record, or a bad one, instead of the boot: the firmware says so on COM1 and
    # stops with a triple fault.
    def publish(self, fw_cfg, *args, **kwargs) -> bytes:
        if record is not None:
            fw_cfg.add_file(BOOT_FILE, record)
        return b""

    monkeypatch.setattr(Firmware, "publish", publish)
    result, _ = run("hello", True)
    assert result.serial_text == line
    assert result.exit_status == ExitStatus.TRIPLE_FAULT
    assert "ffff" in result.registers  # it stopped in the ROM


def test_the_rom_is_read_only(tmp_path: Path) -> None:
    # mov $0xFFFF0000, %ebx; mov %eax, (%rbx): a write into the ROM.
    kernel = elf64(tmp_path / "w.elf", [(MIB, b"\xbb" + struct.pack("<I", ROM_BASE) + b"\x89\x03",
                                         0x1000)], MIB)  # fmt: skip
    with Machine(serial="capture", firmware=True, fail_on_unclaimed=True) as machine:
        machine.load(kernel)
        if not machine.firmware.read_only:
            pytest.skip("this KVM has no KVM_MEM_READONLY: the ROM is plain memory")
        before = bytes(machine.firmware._rom[:16])
        result = machine.run(timeout=TIMEOUT)
        assert result.outcome == "unclaimed", result.message
        assert (result.unclaimed_mmio.last_address, result.unclaimed_mmio.last_is_write) == (
            ROM_BASE,
            True,
        )
        assert bytes(machine.firmware._rom[:16]) == before
