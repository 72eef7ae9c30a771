"""Guest memory: layout around the MMIO hole, bounds-checked views, and a big guest that
stays small on the host."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pyvmm import Machine, guest_path
from pyvmm.errors import ConfigurationError
from pyvmm.memory import GIB, MIB, GuestMemory, parse_size


@pytest.mark.parametrize(
    ("text", "size"), [("64M", 64 * MIB), ("4G", 4 * GIB), ("512MiB", 512 * MIB), ("8192", 8192)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "4X", "-1M"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigurationError):
        parse_size(text)


def test_small_memory_is_one_region():
    memory = GuestMemory("16M")
    assert [(r.guest_phys_addr, r.size) for r in memory.regions] == [(0, 16 * MIB)]
    memory.close()


def test_memory_above_3g_resumes_at_4g():
    memory = GuestMemory("5G")
    assert [(r.guest_phys_addr, r.size) for r in memory.regions] == [
        (0, 3 * GIB),
        (4 * GIB, 2 * GIB),
    ]
    assert memory.top == 6 * GIB
    assert not memory.contains(3 * GIB)
    memory.view(4 * GIB, 8, np.uint64)[0] = 0x1122334455667788
    assert memory.read(4 * GIB, 2) == b"\x88\x77"
    memory.close()


def test_views_are_bounds_checked_and_typed():
    memory = GuestMemory("2M")
    memory.write(0x1000, b"\x01\x00\x00\x00\x02\x00\x00\x00")
    assert list(memory.view(0x1000, 8, np.uint32)) == [1, 2]
    with pytest.raises(IndexError, match="not RAM"):
        memory.view(2 * MIB - 4, 8)
    with pytest.raises(ValueError, match="aligned"):
        memory.view(0x1001, 8, np.uint32)
    memory.close()


def test_load_from_file_reads_straight_into_ram():
    memory = GuestMemory("2M")
    memory.load_from_file(io.BytesIO(b"xxhello"), 2, 0x2000, 5)
    assert memory.read(0x2000, 5) == b"hello"
    with pytest.raises(EOFError):
        memory.load_from_file(io.BytesIO(b"short"), 0, 0x3000, 10)
    memory.close()


def resident_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_4g_guest_costs_only_what_it_touches(kvm_required):
    before = resident_kib()
    with Machine(memory="4G", serial="capture") as machine:
        machine.load(guest_path("hello"))
        result = machine.run(timeout=60)
        during = resident_kib()
        assert [r.size for r in machine.memory.regions] == [3 * GIB, 1 * GIB]
    assert result.exit_status == 0
    assert result.serial_text == "Hello from a pyvmm guest!\n"
    # 4 GiB of RAM, of which the guest touched its image, stacks and page tables.
    assert during - before < 64 * 1024, f"RSS grew by {during - before} KiB"
