"""Multiboot kernels linked below 1 MiB: loaded where they ask, as QEMU's -kernel loads them,
with pyvmm's GDT, memory map and information structure moved out of their way.

mb_low (multiboot_info at 0x10000, ELF and a.out kludge) and mb_low_gdt (at 0x800, over the
GDT's usual place) run under QEMU (KVM) and pyvmm and must see the same boot information;
mb_low_info (at 0x8000, over the map and structure at 0x9000) boots under pyvmm only: QEMU's
option ROM writes them before it loads the kernel over them. The placement logic is checked
on plain guest RAM for many load addresses, and what cannot fit is refused with one line.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm import ExitStatus, guest_path
from pyvmm.errors import GuestImageError
from pyvmm.layout import BOOT_GDT, CONVENTIONAL_RAM, FIRMWARE_WORK_AREA, Region
from pyvmm.memory import MIB, GuestMemory
from pyvmm.multiboot import INFO_ADDRESS, INFO_SIZE, MMAP_ADDRESS, load_multiboot
from pyvmm.multiboot_header import find_header
from tests.test_multiboot import POWER_OFF, aout_kernel, assert_one_line, elf32, header, parse

TIMEOUT = 60
LOW = guest_path("mb_low")
LOW_AOUT = LOW.with_name("mb_low_aout.bin")
LOW_GDT = guest_path("mb_low_gdt")
LOW_INFO = guest_path("mb_low_info")
QEMU = shutil.which("qemu-system-x86_64")


def run_qemu(kernel: Path, append: str, initrd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [QEMU, "-machine", "q35", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
         "-m", "64M", "-display", "none", "-serial", "stdio", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-kernel", str(kernel), "-append", append, "-initrd", initrd],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")
@pytest.mark.parametrize("kernel", [LOW, LOW_AOUT, LOW_GDT], ids=["elf", "aout", "over-gdt"])
def test_low_kernel_sees_what_qemu_gives(pyvmm_cli, modules, kernel):
    """The same information at the same addresses (modules after the kernel, below 1 MiB),
    but for the loader name and what SeaBIOS adds to the memory map (as test_multiboot).

    mb_low_gdt (at 0x800, not page-aligned) gets one small module: a second one would land
    on QEMU's structure at 0x9500 (pyvmm would move it). Its module shows the one documented
    difference: QEMU page-aligns offsets from the load address, not addresses, so its module
    is not page-aligned, against the spec and the kernel's flag bit 0; pyvmm's is."""
    first, second = modules
    initrd = f"{first} arg1" if kernel == LOW_GDT else f"{first} arg1,{second}"
    qemu = run_qemu(kernel, "low=1", initrd)
    ours = pyvmm_cli("run", str(kernel), "--append", "low=1", "--initrd", initrd,
                     "--timeout", str(TIMEOUT))  # fmt: skip
    assert ours.returncode == 0, ours.stderr
    expected, got = parse(qemu.stdout), parse(ours.stdout)
    assert got["lines"][-1] == "layout ok", ours.stdout
    differ = {"boot_loader_name", "mmap", "mem_upper", "lines"}
    if kernel == LOW_GDT:
        assert expected["lines"][-1] == "FAIL: module 0 at 00007800 is not page-aligned"
        ((start, end, *rest),) = expected["mods"]
        assert got["mods"] == [(start + 0x800, end + 0x800, *rest)]
        differ.add("mods")
    else:
        assert expected["lines"][-1] == "layout ok", qemu.stdout + qemu.stderr
    assert {k: v for k, v in got.items() if k not in differ} == {
        k: v for k, v in expected.items() if k not in differ
    }
    assert got["info"] == INFO_ADDRESS
    assert all(start < CONVENTIONAL_RAM.end for start, *_ in got["mods"])


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize("firmware", [False, True], ids=["direct", "firmware"])
def test_information_moves_out_of_the_kernel(pyvmm_cli, modules, firmware):
    """mb_low_info covers 0x9000-0x9557: the map and the structure go to the lowest free
    place instead, the same with and without --firmware."""
    first, _ = modules
    args = ("--firmware",) if firmware else ()
    completed = pyvmm_cli("run", *args, str(LOW_INFO), "--initrd", str(first),
                          "--timeout", str(TIMEOUT))  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    out = parse(completed.stdout)
    assert out["lines"][-1] == "layout ok", completed.stdout
    assert out["info"] == CONVENTIONAL_RAM.start + (INFO_ADDRESS - MMAP_ADDRESS)


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize("kernel", [LOW, LOW_AOUT])
def test_low_kernel_through_the_firmware(pyvmm_cli, modules, kernel):
    """The firmware fetches a low kernel through fw_cfg like any: the same output."""
    first, second = modules
    initrd = f"{first} arg1,{second}"
    direct = pyvmm_cli("run", str(kernel), "--initrd", initrd, "--timeout", str(TIMEOUT))
    firmware = pyvmm_cli("run", "--firmware", str(kernel), "--initrd", initrd,
                         "--timeout", str(TIMEOUT))  # fmt: skip
    assert (firmware.returncode, direct.returncode) == (0, 0), firmware.stderr
    assert firmware.stdout == direct.stdout
    assert parse(firmware.stdout)["lines"][-1] == "layout ok"


@pytest.mark.usefixtures("kvm_required")
def test_firmware_refuses_a_kernel_over_its_ram(pyvmm_cli):
    completed = pyvmm_cli("run", "--firmware", str(LOW_GDT), "--timeout", str(TIMEOUT))
    assert_one_line(completed, ExitStatus.BAD_IMAGE, "would overwrite the firmware's RAM")


def low_case(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A kernel (and modules) that cannot load below 1 MiB."""
    path = tmp_path / f"{case}.bin"
    if case == "over the BDA":
        return aout_kernel(path, load_addr=0x400), []
    if case == "ELF over the IVT":
        return elf32(path, 0x100, header(0x3) + POWER_OFF, 0x100, entry=0x10C), []
    if case == "into the EBDA":
        return aout_kernel(path, load_addr=0x9F000, bss_end_addr=0x9FD00), []
    if case == "in the VGA hole":
        return aout_kernel(path, load_addr=0xA0000), []
    if case == "across 1 MiB":
        return aout_kernel(path, load_addr=0xFF000, bss_end_addr=MIB + 0x1000), []
    module = tmp_path / "module"
    if case == "modules past the EBDA":
        module.write_bytes(bytes(0x10000))
        return aout_kernel(path, load_addr=0x90000), [str(module)]
    assert case == "no room left"
    # The kernel from 0x500 with a bss to 0x9E000, its module up to 0x9FA00: 0x200 bytes
    # are left, less than the map and structure need.
    module.write_bytes(bytes(0xA00))
    return aout_kernel(path, load_addr=0x500, bss_end_addr=0x9E000), [str(module)]


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("over the BDA", "lies outside conventional memory [0x500, 0x9fc00)"),
        ("ELF over the IVT", "lies outside conventional memory [0x500, 0x9fc00)"),
        ("into the EBDA", "lies outside conventional memory [0x500, 0x9fc00)"),
        ("in the VGA hole", "lies outside conventional memory [0x500, 0x9fc00)"),
        ("across 1 MiB", "lies outside conventional memory [0x500, 0x9fc00)"),
        ("modules past the EBDA", "past its end at 0x9fc00"),
        ("no room left", "leave no room in conventional memory"),
    ],
)
def test_refused_low_kernels(pyvmm_cli, tmp_path, case, message):
    kernel, modules = low_case(tmp_path, case)
    args = ("--initrd", ",".join(modules)) if modules else ()
    completed = pyvmm_cli("run", str(kernel), *args, "--timeout", str(TIMEOUT))
    assert_one_line(completed, ExitStatus.BAD_IMAGE, message)


# ---- the placement on plain guest RAM (no KVM) ----


@pytest.fixture(scope="module")
def ram():
    memory = GuestMemory("2M")
    yield memory
    memory.close()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    load=st.integers(CONVENTIONAL_RAM.start, CONVENTIONAL_RAM.end - 64).map(lambda a: a & ~3),
    bss=st.integers(0, 0x40000),
    module_size=st.one_of(st.none(), st.integers(1, 0x6000)),
)
def test_placement_over_low_addresses(tmp_path_factory, ram, load, bss, module_size):
    """Wherever a kernel lies in conventional memory: either pyvmm's structures are clear of
    it and of what follows it, inside conventional memory and outside the firmware's RAM
    unless at their usual address, and the kernel's bytes survive; or the load is refused."""
    directory = tmp_path_factory.mktemp("low")
    end = min(load + 44 + bss, 0xFFFFF)
    kernel = aout_kernel(directory / "k.bin", load_addr=load, bss_end_addr=end)
    modules = []
    if module_size is not None:
        (directory / "m").write_bytes(b"\x5a" * module_size)
        modules = [str(directory / "m")]
    found = find_header(kernel, kernel.read_bytes(), kernel.stat().st_size)
    ram.fill(0, ram.size)
    try:
        info = load_multiboot(ram, kernel, found, modules=modules)
    except GuestImageError as error:
        fits = end <= CONVENTIONAL_RAM.end
        assert not fits or "past its end" in str(error) or "no room" in str(error), error
        return
    assert end <= CONVENTIONAL_RAM.end
    kernel_region = Region("kernel", load, end - load)
    after = Region("after", info.after_image[0], info.after_image[1] - info.after_image[0])
    usual = {BOOT_GDT.start, MMAP_ADDRESS, INFO_ADDRESS}
    for region in info.regions:
        assert not region.overlaps(kernel_region)
        assert not region.overlaps(after)
        assert CONVENTIONAL_RAM.start <= region.start and region.end <= CONVENTIONAL_RAM.end
        assert region.start in usual or not region.overlaps(FIRMWARE_WORK_AREA)
    gdt, mmap, structure = info.regions
    assert not gdt.overlaps(mmap) and not gdt.overlaps(structure)
    assert ram.read(load, 44) == kernel.read_bytes()[:44]
    fields = struct.unpack_from("<22I", ram.read(info.address, INFO_SIZE))
    assert (fields[0], fields[12]) == (0x24F, info.mmap_address)
