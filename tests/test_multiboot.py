"""Multiboot v1 boot as QEMU's -kernel does it: the multiboot_info kernel on the real /dev/kvm
(CLI and Python API) checked against the layout QEMU builds, the a.out-kludge flat binary, every
malformed image with its one line and status, and the loader's logic on plain guest RAM.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pyvmm import ExitStatus, Machine, guest_path
from pyvmm._native import lib
from pyvmm.boot import BootProtocol, load_guest
from pyvmm.e820 import memory_map
from pyvmm.errors import ConfigurationError, GuestImageError
from pyvmm.memory import GIB, MIB, GuestMemory, parse_size
from pyvmm.multiboot import (
    INFO_ADDRESS,
    MMAP_ADDRESS,
    load_multiboot,
    split_module_list,
)
from pyvmm.multiboot_header import find_header
from tests.test_loader import elf64

KERNEL = guest_path("multiboot_info")
AOUT_KERNEL = KERNEL.with_name("multiboot_aout.bin")
HEADER_MAGIC = 0x1BADB002
PAGE = 4096
#: Every guest run here ends well within this (they take well under a second).
TIMEOUT = 60

#: 32-bit code: outw(0x604, 0x2000) (ACPI power-off), then cli; hlt.
POWER_OFF = bytes.fromhex("66ba0406" "66b80020" "66ef" "fa" "f4")  # fmt: skip


def header(flags: int, fields: tuple[int, ...] = (), checksum: int | None = None) -> bytes:
    """A multiboot header: magic, flags, checksum (correct unless given), then fields."""
    if checksum is None:
        checksum = -(HEADER_MAGIC + flags) & 0xFFFFFFFF
    return struct.pack(f"<III{len(fields)}I", HEADER_MAGIC, flags, checksum, *fields)


def aout_kernel(path: Path, load_addr: int = MIB, flags: int = 0x10003, **fields: int) -> Path:
    """A flat a.out-kludge kernel at load_addr: its header, then code that powers off."""
    size = 32 + (16 if flags & 4 else 0)
    values = {
        "header_addr": load_addr,
        "load_addr": load_addr,
        "load_end_addr": 0,
        "bss_end_addr": 0,
        "entry_addr": load_addr + size,
    }
    values.update(fields)
    video = (0, 0, 0, 0) if flags & 4 else ()
    path.write_bytes(header(flags, (*values.values(), *video)) + POWER_OFF)
    return path


def elf32(path: Path, address: int, data: bytes, memory_size: int, entry: int) -> Path:
    """An ELF32 i386 executable with one PT_LOAD segment of data at address."""
    offset = 52 + 32
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, entry, 52, 0, 0, 52, 32, 1, 40, 0, 0
    )  # fmt: skip
    phdr = struct.pack("<IIIIIIII", 1, offset, address, address, len(data), memory_size, 7, 4)
    path.write_bytes(ehdr + phdr + data)
    return path


def kernel_end(path: Path) -> int:
    """One past the last byte of the kernel image, by its program headers."""
    with path.open("rb") as file:
        return max(
            s["p_paddr"] + s["p_memsz"]
            for s in ELFFile(file).iter_segments()
            if s["p_type"] == "PT_LOAD"
        )


def page_align(value: int) -> int:
    return (value + PAGE - 1) // PAGE * PAGE


def fnv1a(data: bytes) -> int:
    """32-bit FNV-1a, as the kernel computes it over each module."""
    value = 2166136261
    for byte in data:
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def expected_map(size: int) -> list[tuple[int, int, int]]:
    """The memory map pyvmm reports for size bytes of RAM (docs/guest-abi.md, "Multiboot")."""
    low = min(size, 3 * GIB)
    entries = [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
        (MIB, low - MIB, 1),
        (0xE000_0000, 0x1000_0000, 2),  # PCI ECAM
        (0xFFFB_C000, 0x4000, 2),  # Intel VMX identity map and TSS
    ]
    if size > 3 * GIB:
        entries.append((4 * GIB, size - 3 * GIB, 1))
    return entries


def parse(text: str) -> dict:
    """The kernel's output as a dict: single fields by name, mmap and mod lines as lists."""
    out: dict = {"mmap": [], "mods": [], "lines": text.splitlines()}
    for line in out["lines"]:
        key, _, rest = line.partition(" ")
        if key == "mmap":
            base, length, kind = rest.split()
            out["mmap"].append((int(base, 16), int(length, 16), int(kind)))
        elif key == "mod":
            _, start, end, rest = rest.split(" ", 3)
            string, _, rest = rest[1:].partition('" fnv1a ')
            fnv, _, first = rest.partition(" first line ")
            out["mods"].append((int(start, 16), int(end, 16), string, int(fnv, 16), first[1:-1]))
        elif key in ("cmdline", "boot_loader_name"):
            out[key] = rest[1:-1]
        elif key in ("mem_lower", "mem_upper"):
            out[key] = int(rest.split()[0])
        elif key in ("magic", "flags", "boot_device"):
            out[key] = int(rest, 16)
        elif line.startswith("info at "):
            out["info"] = int(line.split()[-1], 16)
    return out


def check_output(text: str, *, kernel: str, append: str, entries, size: int) -> dict:
    """Every field the kernel printed, against what pyvmm must have built."""
    out = parse(text)
    assert out["lines"][-2:] == ["memory info matches the map", "layout ok"], text
    assert out["magic"] == 0x2BADB002
    assert out["info"] == INFO_ADDRESS
    # mem, boot device, cmdline, mods, mmap, boot loader name: QEMU's set.
    assert out["flags"] == 0x24F
    assert out["boot_device"] == 0x8000FFFF
    assert out["cmdline"] == f"{kernel} {append}"
    assert out["boot_loader_name"] == "pyvmm"
    assert out["mmap"] == expected_map(size)
    assert out["mem_lower"] == 639
    assert out["mem_upper"] == (min(size, 3 * GIB) - MIB) // 1024
    # After the kernel, page-aligned: the module list and strings, then each module.
    strings = sum(len(e) + 1 for e in entries) + len(out["cmdline"]) + 1 + len("pyvmm") + 1
    at = page_align(page_align(kernel_end(KERNEL)) + 16 * len(entries) + strings)
    assert len(out["mods"]) == len(entries)
    for (start, end, string, fnv, first), entry in zip(out["mods"], entries, strict=True):
        data = Path(entry.split()[0]).read_bytes()
        assert (start, end, string) == (at, at + len(data), entry)
        assert fnv == fnv1a(data)
        assert first == data.split(b"\n")[0].decode()
        at = page_align(end)
    return out


# ---- the kernel on KVM ----


@pytest.mark.usefixtures("kvm_required")
def test_cli_boots_kernel_with_cmdline_and_modules(pyvmm_cli, modules):
    first, second = modules
    entries = [f"{first} arg1 arg2", str(second)]
    completed = pyvmm_cli(
        "run", str(KERNEL), "--append", "console=ttyS0 answer=42", "--initrd", ",".join(entries),
        "--cpus", "2", "--timeout", str(TIMEOUT),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    check_output(
        completed.stdout,
        kernel=str(KERNEL),
        append="console=ttyS0 answer=42",
        entries=entries,
        size=64 * MIB,
    )


@pytest.mark.usefixtures("kvm_required")
def test_cli_repeated_initrd_and_escaped_comma(pyvmm_cli, modules, tmp_path):
    first, second = modules
    comma = tmp_path / "a,b.txt"
    comma.write_bytes(b"comma in the name\n")
    completed = pyvmm_cli(
        "run", str(KERNEL), "--initrd", f"{str(comma).replace(',', ',,')} x,,y,{first}",
        "--initrd", str(second), "--timeout", str(TIMEOUT),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    # No --append: QEMU's "%s %s" leaves a trailing space, and so does pyvmm.
    check_output(
        completed.stdout,
        kernel=str(KERNEL),
        append="",
        entries=[f"{comma} x,y", str(first), str(second)],
        size=64 * MIB,
    )


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize("memory", ["2M", "64M", "5G"])
def test_python_api_and_memory_map_follow_ram(modules, memory):
    first, second = modules
    entries = [str(first), f"{second} the second"]
    with Machine(memory=memory, cpus=2, serial="capture") as machine:
        image = machine.load(KERNEL, append="a b  c", initrd=entries)
        boot = machine.boot
        assert (boot.protocol, boot.boot_cpu_only, machine.irqchip) == (
            BootProtocol.MULTIBOOT,
            True,
            True,
        )
        assert boot.registers == {"rax": 0x2BADB002, "rbx": INFO_ADDRESS}
        assert image.entry == boot.multiboot.image.entry
        result = machine.run(timeout=TIMEOUT)
        # Only the boot CPU ran: the other still waits for INIT/SIPI, as on a PC.
        assert machine.vcpus[1].get_mp_state() == lib.KVM_MP_STATE_UNINITIALIZED
    assert result.exit_status == 0, result.serial_text
    out = check_output(
        result.serial_text,
        kernel=str(KERNEL),
        append="a b  c",
        entries=entries,
        size=parse_size(memory),
    )
    placed = [(m.start, m.end, m.string) for m in boot.multiboot.modules]
    assert placed == [m[:3] for m in out["mods"]]
    assert [(r.base, r.length, r.type) for r in boot.multiboot.memory_map] == out["mmap"]


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs qemu-system-x86_64")
@pytest.mark.parametrize("kernel", [KERNEL, AOUT_KERNEL], ids=["elf", "aout"])
def test_same_information_as_qemu(pyvmm_cli, modules, kernel):
    """QEMU's -kernel (q35, TCG) and pyvmm give the kernel the same boot information, but
    for the loader name and what SeaBIOS adds to the memory map (docs/guest-abi.md)."""
    first, second = modules
    initrd = f"{first} arg1 arg2,{second}"
    qemu = subprocess.run(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64M",
         "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
         "-append", "answer=42", "-initrd", initrd],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    ours = pyvmm_cli("run", str(kernel), "--append", "answer=42", "--initrd", initrd)
    assert ours.returncode == 0, ours.stderr
    expected, got = parse(qemu.stdout), parse(ours.stdout)
    assert expected["lines"][-1] == "layout ok", qemu.stdout + qemu.stderr
    differ = {"boot_loader_name", "mmap", "mem_upper", "lines"}
    assert {k: v for k, v in got.items() if k not in differ} == {
        k: v for k, v in expected.items() if k not in differ
    }
    assert (expected["boot_loader_name"], got["boot_loader_name"]) == ("qemu", "pyvmm")
    # SeaBIOS keeps 128 KiB at the top of low RAM, and q35 has chipset and ROM ranges.
    assert set(got["mmap"]) - set(expected["mmap"]) == {
        (MIB, 63 * MIB, 1), (0xE000_0000, 0x1000_0000, 2), (0xFFFB_C000, 0x4000, 2)
    }  # fmt: skip
    assert got["mem_upper"] == 63 * 1024


@pytest.mark.usefixtures("kvm_required")
def test_aout_kludge_flat_binary(pyvmm_cli, modules):
    head = AOUT_KERNEL.read_bytes()[:48]
    assert head[:4] != b"\x7fELF"  # a flat binary: the header is all the loader has
    magic, flags = struct.unpack_from("<II", head)
    assert (magic, flags & 0x10000) == (HEADER_MAGIC, 0x10000)
    first, _ = modules
    completed = pyvmm_cli(
        "run", str(AOUT_KERNEL), "--append", "flat", "--initrd", str(first),
        "--timeout", str(TIMEOUT),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    elf = parse(pyvmm_cli("run", str(KERNEL), "--append", "flat", "--initrd", str(first)).stdout)
    out = parse(completed.stdout)
    # The same kernel and the same layout: only the path in the command line differs.
    assert out["cmdline"] == f"{AOUT_KERNEL} flat"
    assert {k: v for k, v in out.items() if k not in ("cmdline", "lines")} == {
        k: v for k, v in elf.items() if k not in ("cmdline", "lines")
    }
    assert out["lines"][-1] == "layout ok"


@pytest.mark.usefixtures("kvm_required")
def test_boot_elf_forces_pyvmm_abi(pyvmm_cli):
    # Entered with pyvmm's ELF ABI, the kernel finds no multiboot magic in EAX.
    completed = pyvmm_cli("run", str(KERNEL), "--boot", "elf", "--timeout", str(TIMEOUT))
    assert completed.returncode == (1 << 1) | 1, completed.stderr
    assert completed.stdout == "magic 00000000\nFAIL: magic\n"


@pytest.mark.usefixtures("kvm_required")
def test_elf_guests_keep_their_abi():
    with Machine(cpus=2, serial="capture") as machine:
        machine.load(guest_path("smp"))
        assert (machine.boot.protocol, machine.boot.boot_cpu_only) == (BootProtocol.ELF, False)
        assert (machine.boot.registers, machine.irqchip) == ({}, False)
        result = machine.run(timeout=TIMEOUT)
    assert result.exit_status == 0
    assert result.serial_text.splitlines()[-1] == "all 2 cpus reported"


@pytest.mark.usefixtures("kvm_required")
def test_video_mode_flag_is_ignored_with_a_warning(pyvmm_cli, tmp_path):
    kernel = aout_kernel(tmp_path / "video.bin", flags=0x10007)
    completed = pyvmm_cli("run", str(kernel), "--timeout", str(TIMEOUT))
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.startswith(f"pyvmm: warning: {kernel} asks for a video mode")
    assert len(completed.stderr.splitlines()) == 1


@pytest.mark.usefixtures("kvm_required")
def test_multiboot_elf_at_another_address(pyvmm_cli, tmp_path):
    """An ELF32 multiboot kernel loads by its program headers, wherever they say."""
    data = header(0x3) + POWER_OFF
    kernel = elf32(tmp_path / "at16m.elf", 16 * MIB, data, 0x2000, entry=16 * MIB + 12)
    completed = pyvmm_cli("run", str(kernel), "--timeout", str(TIMEOUT))
    assert (completed.returncode, completed.stderr) == (0, "")


# ---- malformed images and bad input: one line, a distinct status, no traceback ----


def assert_one_line(completed, status: int, text: str) -> None:
    assert completed.returncode == status, completed.stderr
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: ") and text in lines[0], lines


def bad_image(tmp_path: Path, case: str) -> Path:
    """The image of one malformed case."""
    path = tmp_path / f"{case}.bin"
    if case == "bad checksum":
        path.write_bytes(header(0x10003, checksum=5) + bytes(64))
    elif case == "bad magic":
        # A near miss of the magic with a matching checksum: no header at all.
        path.write_bytes(struct.pack("<III", 0x1BADB003, 0, -0x1BADB003 & 0xFFFFFFFF))
    elif case == "truncated flags":
        path.write_bytes(bytes(64) + struct.pack("<I", HEADER_MAGIC) + b"\0\0")
    elif case == "truncated address fields":
        path.write_bytes(bytes(64) + header(0x10003)[:20])
    elif case == "header beyond 8 KiB":
        # Magic, flags and checksum end at byte 8192; the address fields go past it.
        path.write_bytes(bytes(8180) + header(0x10003, (MIB, MIB, 0, 0, MIB + 32)))
    elif case == "above RAM":
        aout_kernel(path, load_addr=256 * MIB)
    elif case == "over the IVT":
        aout_kernel(path, load_addr=0x100)
    elif case == "ELF above RAM":
        path = elf32(path, 256 * MIB, header(0x3) + POWER_OFF, 0x100, entry=256 * MIB + 12)
    elif case == "ELF64":
        path = elf64(path, [(MIB, header(0x3) + POWER_OFF, 0x100)], entry=MIB + 12)
    elif case == "load_addr above header_addr":
        aout_kernel(path, header_addr=MIB, load_addr=MIB + 0x100)
    elif case == "header_addr too far":
        aout_kernel(path, header_addr=MIB + 0x100)
    elif case == "load_end below load_addr":
        aout_kernel(path, load_end_addr=MIB - 1)
    elif case == "file shorter than load_end":
        aout_kernel(path, load_end_addr=MIB + 0x1000)
    elif case == "bss_end below load_end":
        aout_kernel(path, load_end_addr=MIB + 40, bss_end_addr=MIB + 39)
    elif case == "entry outside":
        aout_kernel(path, entry_addr=MIB + 0x1000)
    elif case == "unknown required flag":
        aout_kernel(path, flags=0x10013)
    elif case == "not ELF, no address fields":
        path.write_bytes(header(0x3) + POWER_OFF)
    return path


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    ("case", "boot", "message"),
    [
        ("bad checksum", None, "bad multiboot header checksum at offset 0x0"),
        ("bad magic", None, "not an ELF file"),
        ("bad magic", "multiboot", "no multiboot header"),
        ("truncated flags", None, "truncated multiboot header"),
        ("truncated address fields", None, "truncated multiboot header"),
        ("header beyond 8 KiB", None, "past the end of the first 8192 bytes"),
        ("above RAM", None, "and guest RAM above 1 MiB (RAM ends at 0x4000000"),
        ("over the IVT", None, "lies outside conventional memory [0x500, 0x9fc00)"),
        ("ELF above RAM", None, "and guest RAM above 1 MiB ([0x100000, 0x4000000))"),
        ("ELF64", None, "ELF64 multiboot image"),
        ("load_addr above header_addr", None, "load_addr 0x100100 is above header_addr"),
        ("header_addr too far", None, "more than the header's file offset"),
        ("load_end below load_addr", None, "load_end_addr 0xfffff is below load_addr"),
        ("file shorter than load_end", None, "is truncated"),
        ("bss_end below load_end", None, "bss_end_addr 0x100027 is below"),
        ("entry outside", None, "entry_addr 0x101000 is outside the loaded image"),
        ("unknown required flag", None, "flag bits 0x0010"),
        ("not ELF, no address fields", None, "is not an ELF file"),
    ],
)
def test_malformed_images(pyvmm_cli, tmp_path, case, boot, message):
    image = bad_image(tmp_path, case)
    args = ("--boot", boot) if boot else ()
    completed = pyvmm_cli("run", str(image), *args, "--timeout", str(TIMEOUT))
    assert_one_line(completed, ExitStatus.BAD_IMAGE, message)


@pytest.mark.usefixtures("kvm_required")
def test_elf64_refusal_names_qemu(pyvmm_cli, tmp_path):
    completed = pyvmm_cli("run", str(bad_image(tmp_path, "ELF64")))
    assert_one_line(completed, ExitStatus.BAD_IMAGE, "Cannot load x86-64 image")


@pytest.mark.usefixtures("kvm_required")
def test_missing_module(pyvmm_cli, modules, tmp_path):
    first, _ = modules
    missing = tmp_path / "missing.txt"
    completed = pyvmm_cli("run", str(KERNEL), "--initrd", f"{first},{missing} some args")
    assert_one_line(completed, ExitStatus.BAD_IMAGE, f"multiboot module {missing} not found")


@pytest.mark.usefixtures("kvm_required")
def test_modules_that_do_not_fit(pyvmm_cli, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(MIB // 2))
    # 2 MiB: the kernel and one module fit below 2 MiB, three modules do not.
    fits = pyvmm_cli("run", str(KERNEL), "--memory", "2M", "--initrd", str(big))
    assert fits.returncode == 0, fits.stderr
    completed = pyvmm_cli("run", str(KERNEL), "--memory", "2M", "--initrd", f"{big},{big},{big}")
    assert_one_line(completed, ExitStatus.BAD_IMAGE, "give the guest more --memory")


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hello", "--append", "x"), "--append and --initrd are for multiboot kernels"),
        (("hello", "--initrd", "x"), "--append and --initrd are for multiboot kernels"),
        ((str(KERNEL), "--mode", "long"), "entered in 32-bit protected mode, not long"),
        ((str(KERNEL), "--initrd", " leading-space"), "has no file name"),
    ],
)
def test_bad_usage(pyvmm_cli, args, message):
    assert_one_line(pyvmm_cli("run", *args), ExitStatus.USAGE, message)


@pytest.mark.usefixtures("kvm_required")
def test_unknown_boot_protocol(pyvmm_cli):
    completed = pyvmm_cli("run", "--boot", "linux16")
    assert completed.returncode == ExitStatus.USAGE and "invalid choice" in completed.stderr


# ---- the loader's logic on plain guest RAM (no KVM) ----


@pytest.fixture
def memory():
    memory = GuestMemory("4M")
    yield memory
    memory.close()


def test_split_module_list():
    assert split_module_list("a") == ["a"]
    assert split_module_list("m1 x y,m2") == ["m1 x y", "m2"]
    assert split_module_list("a,,b c,,d,e") == ["a,b c,d", "e"]
    assert split_module_list("a,,,b") == ["a,", "b"]


def test_find_header_skips_a_bad_checksum_for_a_good_one(tmp_path):
    data = header(0, checksum=1) + header(0x3)
    found = find_header(tmp_path / "k", data, len(data))
    assert (found.offset, found.flags, found.address_fields) == (12, 3, False)
    assert find_header(tmp_path / "k", bytes(64), 64) is None
    unaligned = bytes(2) + header(0x3)
    assert find_header(tmp_path / "k", unaligned, len(unaligned)) is None
    # Magic at 8188: its flags and checksum would lie past the first 8192 bytes (GRUB and
    # QEMU do not look there either), so it is no header, not a truncated one.
    late = bytes(8188) + header(0x3) + bytes(100)
    assert find_header(tmp_path / "k", late[:8192], len(late)) is None


@pytest.mark.parametrize(
    ("size", "entries"),
    [
        ("1M", [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2)]),
        ("3G", [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
                (MIB, 3 * GIB - MIB, 1)]),
    ],
)  # fmt: skip
def test_memory_map_edges(size, entries):
    memory = GuestMemory(size)
    try:
        ranges = [(r.base, r.length, r.type) for r in memory_map(memory)]
    finally:
        memory.close()
    assert ranges == [*entries, (0xE000_0000, 0x1000_0000, 2), (0xFFFB_C000, 0x4000, 2)]


def test_info_structure_bytes(tmp_path, memory):
    module = tmp_path / "mod"
    module.write_bytes(b"payload")
    kernel = aout_kernel(tmp_path / "k.bin", bss_end_addr=MIB + 0x1800)
    memory.fill(MIB + 0x1000, 0x800, 0xAA)  # where the bss goes: the loader must zero it
    found = find_header(kernel, kernel.read_bytes(), kernel.stat().st_size)
    info = load_multiboot(memory, str(kernel), found, append="x=1", modules=[f"{module} m"])
    assert info.image.entry == MIB + 32
    assert memory.read(MIB, 32 + len(POWER_OFF)) == kernel.read_bytes()
    assert not memory.view(MIB + 0x1000, 0x800).any()
    fields = struct.unpack_from("<22I", memory.read(INFO_ADDRESS, 88))
    flags, lower, upper, device, cmdline, count, mods = fields[:7]
    assert (flags, lower, upper, device, count, mods) == (0x24F, 639, 3072, 0x8000FFFF, 1, 0x102000)
    mmap_length, mmap_addr, loader_name = fields[11], fields[12], fields[16]
    assert (mmap_length, mmap_addr) == (24 * 6, MMAP_ADDRESS)
    entry = struct.unpack_from("<IQQI", memory.read(MMAP_ADDRESS, 24))
    assert entry == (20, 0, 0x9FC00, 1)

    def string(address: int) -> bytes:
        return memory.read(address, 512).split(b"\0")[0]

    assert string(cmdline) == f"{kernel} x=1".encode()
    assert string(loader_name) == b"pyvmm"
    start, end, mod_string, _ = struct.unpack_from("<IIII", memory.read(mods, 16))
    assert (start, end, string(mod_string)) == (0x103000, 0x103007, f"{module} m".encode())
    assert memory.read(start, 7) == b"payload"
    assert info.modules[0].start == start


def test_refused_images_write_nothing(tmp_path, memory):
    kernel = aout_kernel(tmp_path / "k.bin")
    big = tmp_path / "big"
    big.write_bytes(bytes(4 * MIB))
    found = find_header(kernel, kernel.read_bytes(), kernel.stat().st_size)
    with pytest.raises(GuestImageError, match="more --memory"):
        load_multiboot(memory, kernel, found, modules=[str(big)])
    with pytest.raises(GuestImageError, match="not found"):
        load_multiboot(memory, kernel, found, modules=[str(tmp_path / "none")])
    with pytest.raises(ConfigurationError, match="NUL"):
        load_multiboot(memory, kernel, found, append="a\0b")
    assert not memory.view(0, memory.size).any(), "a refused image wrote to guest RAM"


def test_load_guest_detects_the_protocol(tmp_path, memory):
    plan = load_guest(memory, aout_kernel(tmp_path / "k.bin"))
    assert (plan.protocol, plan.mode.value, plan.boot_cpu_only) == (
        BootProtocol.MULTIBOOT, "protected", True,
    )  # fmt: skip
    module = tmp_path / "module"
    module.write_bytes(b"m")
    one = load_guest(memory, tmp_path / "k.bin", initrd=str(module))  # one entry, not letters
    assert [m.string for m in one.multiboot.modules] == [str(module)]
    with pytest.raises(ConfigurationError, match="unknown boot protocol"):
        load_guest(memory, tmp_path / "k.bin", boot="pxe")
    with pytest.raises(GuestImageError, match="not found"):
        load_guest(memory, tmp_path / "none.bin")
    with pytest.raises(GuestImageError, match="is a directory"):
        load_guest(memory, tmp_path)


# ---- SMP: the boot CPU starts the others with INIT/SIPI ----


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_aps_start_only_by_init_sipi(pyvmm_cli, cpus):
    completed = pyvmm_cli(
        "run", "multiboot_smp", "--cpus", str(cpus), "--append", f"cpus={cpus}",
        "--timeout", str(TIMEOUT),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    ids = " ".join(str(i) for i in range(cpus))
    assert completed.stdout == f"no AP ran before INIT/SIPI\n{cpus} cpus up, APIC IDs: {ids}\n"


@pytest.mark.usefixtures("kvm_required")
def test_smp_kernel_notices_a_missing_cpu(pyvmm_cli):
    completed = pyvmm_cli(
        "run", "multiboot_smp", "--cpus", "2", "--append", "cpus=3", "--timeout", str(TIMEOUT)
    )
    assert completed.returncode == (3 << 1) | 1
    assert completed.stdout.splitlines()[-2:] == [
        "2 cpus up, APIC IDs: 0 1",
        "FAIL: expected 3 cpus",
    ]
