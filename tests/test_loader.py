"""The ELF loader's checks, on images built here byte by byte (pure logic: no KVM)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvmm.errors import GuestImageError
from pyvmm.loader import load_elf
from pyvmm.memory import MIB, GuestMemory

ET_EXEC, ET_DYN = 2, 3
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1


def elf64(path: Path, segments, entry: int, e_type: int = ET_EXEC, machine: int = EM_X86_64):
    """Write an ELF64 file: segments are (guest address, data bytes, memory size)."""
    header_size, phdr_size = 64, 56
    data_offset = header_size + phdr_size * len(segments)
    headers, blobs = b"", b""
    for address, data, memory_size in segments:
        offset = data_offset + len(blobs)
        headers += struct.pack(
            "<IIQQQQQQ", PT_LOAD, 7, offset, address, address, len(data), memory_size, 0x1000
        )
        blobs += data
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        e_type, machine, 1, entry, header_size, 0, 0, header_size, phdr_size,
        len(segments), 64, 0, 0,
    )  # fmt: skip
    path.write_bytes(header + headers + blobs)
    return path


@pytest.fixture
def memory():
    memory = GuestMemory("4M")
    yield memory
    memory.close()


def test_segments_load_and_bss_is_zeroed(tmp_path, memory):
    memory.fill(MIB, 0x3000, 0xAA)  # dirt a fresh guest would not have
    image = elf64(
        tmp_path / "ok.elf",
        [(MIB, b"\x90" * 16, 0x1000), (MIB + 0x2000, b"data", 0x1000)],
        entry=MIB,
    )
    loaded = load_elf(memory, image)
    assert (loaded.entry, loaded.elf_class, len(loaded.segments)) == (MIB, 64, 2)
    assert memory.read(MIB, 17) == b"\x90" * 16 + b"\0"
    assert memory.read(MIB + 0x2000, 6) == b"data\0\0"
    assert memory.read(MIB + 0x1000, 1) == b"\xaa"  # between segments: untouched


@pytest.mark.parametrize(
    ("segments", "entry", "message"),
    [
        ([(MIB, b"x", 0x2000), (MIB + 0x1000, b"y", 0x10)], MIB, "overlap"),
        ([(0x8000, b"x", 0x10)], 0x8000, "outside guest RAM above 1 MiB"),
        ([(4 * MIB - 8, b"x", 0x10)], 4 * MIB - 8, "give it more --memory"),
        ([(MIB, b"x", 0x10)], 2 * MIB, "entry point 0x200000 is outside"),
        ([], MIB, "no loadable segment"),
    ],
)
def test_bad_placement_is_refused(tmp_path, memory, segments, entry, message):
    image = elf64(tmp_path / "bad.elf", segments, entry)
    with pytest.raises(GuestImageError, match=message):
        load_elf(memory, image)
    assert not memory.view(0, memory.size).any(), "a refused image wrote to guest RAM"


def test_real_mode_images_load_in_conventional_memory(tmp_path, memory):
    image = elf64(tmp_path / "boot.elf", [(0x7C00, b"\xf4", 0x200)], entry=0x7C00)
    assert load_elf(memory, image, real_mode=True).entry == 0x7C00
    high = elf64(tmp_path / "high.elf", [(MIB, b"\xf4", 0x10)], entry=MIB)
    with pytest.raises(GuestImageError, match="conventional memory"):
        load_elf(memory, high, real_mode=True)


def test_shared_objects_and_mismatched_classes_are_refused(tmp_path, memory):
    pie = elf64(tmp_path / "pie.elf", [(MIB, b"x", 0x10)], MIB, e_type=ET_DYN)
    with pytest.raises(GuestImageError, match="link it static and non-PIE"):
        load_elf(memory, pie)
    wrong = elf64(tmp_path / "i386-in-elf64.elf", [(MIB, b"x", 0x10)], MIB, machine=EM_386)
    with pytest.raises(GuestImageError, match="not x86"):
        load_elf(memory, wrong)


def test_file_shorter_than_its_segments(tmp_path, memory):
    image = elf64(tmp_path / "short.elf", [(MIB, b"x" * 100, 0x100)], MIB)
    image.write_bytes(image.read_bytes()[:-50])
    with pytest.raises(GuestImageError, match="truncated"):
        load_elf(memory, image)


def test_directory_is_not_an_image(tmp_path, memory):
    with pytest.raises(GuestImageError, match="is a directory, not a regular file"):
        load_elf(memory, tmp_path)
