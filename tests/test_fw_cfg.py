"""fw_cfg: item encoding, the file directory, the legacy ports and DMA (no KVM needed), and the
fw_cfg guest on the real /dev/kvm reading everything both ways."""

from __future__ import annotations

import random
import struct

import pytest

from pyvmm import Machine, guest_path
from pyvmm.bus import Bus
from pyvmm.devices import fw_cfg as fc
from pyvmm.devices.fw_cfg import E820Entry, FwCfg, add_fw_cfg, e820_entries, encode_e820
from pyvmm.errors import ConfigurationError
from pyvmm.memory import GIB, MIB, GuestMemory

SELECTOR, DATA, DMA = 0x510, 0x511, 0x514
#: Where the unit tests put a DMA control structure and its buffer, in low RAM.
ACCESS, BUFFER = 0x8000, 0x9000


@pytest.fixture
def memory():
    memory = GuestMemory("16M")
    yield memory
    memory.close()


@pytest.fixture
def bus() -> Bus:
    return Bus("port I/O", 1 << 16)


@pytest.fixture
def device(bus: Bus, memory: GuestMemory) -> FwCfg:
    return FwCfg(bus, memory, cpus=2)


# ---- a guest's port accesses, through the bus as the run loop dispatches them ----


def port_write(bus: Bus, port: int, value: int, size: int, byteorder: str = "little") -> None:
    """An out of size bytes; byteorder "big" is what a guest's out of bswap(value) sends."""
    claimed = bus.find(port)
    assert claimed is not None
    data = memoryview(bytearray(value.to_bytes(size, byteorder)))
    claimed.handler(port - claimed.base, data, True)


def port_read(bus: Bus, port: int, size: int = 1) -> int:
    claimed = bus.find(port)
    assert claimed is not None
    data = bytearray(b"\xee" * size)
    claimed.handler(port - claimed.base, memoryview(data), False)
    return int.from_bytes(data, "little")


def legacy_read(bus: Bus, key: int, length: int) -> bytes:
    port_write(bus, SELECTOR, key, 2)
    return bytes(port_read(bus, DATA) for _ in range(length))


def start_dma(bus: Bus, address: int) -> None:
    """As the guest does it: the big-endian address, high half at 0x514, low half at 0x518."""
    port_write(bus, DMA, address >> 32, 4, "big")
    port_write(bus, DMA + 4, address & 0xFFFF_FFFF, 4, "big")


def dma(
    bus: Bus,
    memory: GuestMemory,
    control: int,
    length: int,
    target: int = BUFFER,
    at: int = ACCESS,
) -> int:
    memory.write(at, struct.pack(">IIQ", control, length, target))
    start_dma(bus, at)
    return int.from_bytes(memory.read(at, 4), "big")


def select_read(key: int) -> int:
    return key << 16 | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_READ


# ---- items ----


def test_standard_items_are_encoded_as_qemu_does(device: FwCfg) -> None:
    assert device.item(fc.FW_CFG_SIGNATURE) == b"QEMU"
    assert device.item(fc.FW_CFG_ID) == struct.pack("<I", 3)  # traditional + DMA
    assert device.item(fc.FW_CFG_RAM_SIZE) == struct.pack("<Q", 16 * MIB)
    assert device.item(fc.FW_CFG_NB_CPUS) == struct.pack("<H", 2)
    assert device.item(fc.FW_CFG_MAX_CPUS) == struct.pack("<H", 2)


def test_max_cpus_can_differ_from_the_boot_cpus(bus: Bus, memory: GuestMemory) -> None:
    device = FwCfg(bus, memory, cpus=1, max_cpus=4)
    assert device.item(fc.FW_CFG_NB_CPUS) == b"\x01\x00"
    assert device.item(fc.FW_CFG_MAX_CPUS) == b"\x04\x00"


def test_key_numbers_are_qemus() -> None:
    # include/standard-headers/linux/qemu_fw_cfg.h
    assert (fc.FW_CFG_RAM_SIZE, fc.FW_CFG_NB_CPUS, fc.FW_CFG_MAX_CPUS) == (0x03, 0x05, 0x0F)
    assert (fc.FW_CFG_KERNEL_ADDR, fc.FW_CFG_KERNEL_SIZE, fc.FW_CFG_KERNEL_CMDLINE) == (7, 8, 9)
    assert (fc.FW_CFG_INITRD_ADDR, fc.FW_CFG_INITRD_SIZE) == (0x0A, 0x0B)
    assert (fc.FW_CFG_KERNEL_ENTRY, fc.FW_CFG_KERNEL_DATA, fc.FW_CFG_INITRD_DATA) == (
        0x10,
        0x11,
        0x12,
    )
    assert (fc.FW_CFG_CMDLINE_ADDR, fc.FW_CFG_CMDLINE_SIZE, fc.FW_CFG_CMDLINE_DATA) == (
        0x13,
        0x14,
        0x15,
    )
    assert (fc.FW_CFG_SETUP_ADDR, fc.FW_CFG_SETUP_SIZE, fc.FW_CFG_SETUP_DATA) == (0x16, 0x17, 0x18)
    assert (fc.FW_CFG_FILE_DIR, fc.FW_CFG_FILE_FIRST) == (0x19, 0x20)
    assert fc.FW_CFG_DMA_SIGNATURE.to_bytes(8, "big") == b"QEMU CFG"


def test_boot_items(device: FwCfg) -> None:
    device.set_kernel(b"\x7fELF kernel", addr=0x100000, entry=0x100020)
    device.set_initrd(b"initrd!", addr=0x800000)
    device.set_cmdline("console=ttyS0 quiet", addr=0x20000)
    device.set_setup(b"\x00" * 1024, addr=0x10000)
    assert device.item(fc.FW_CFG_KERNEL_DATA) == b"\x7fELF kernel"
    assert device.item(fc.FW_CFG_KERNEL_SIZE) == struct.pack("<I", 11)
    assert device.item(fc.FW_CFG_KERNEL_ADDR) == struct.pack("<I", 0x100000)
    assert device.item(fc.FW_CFG_KERNEL_ENTRY) == struct.pack("<I", 0x100020)
    assert device.item(fc.FW_CFG_INITRD_DATA) == b"initrd!"
    assert device.item(fc.FW_CFG_INITRD_SIZE) == struct.pack("<I", 7)
    assert device.item(fc.FW_CFG_INITRD_ADDR) == struct.pack("<I", 0x800000)
    # The command line is a C string, and its size counts the NUL, as in QEMU's x86 boot.
    assert device.item(fc.FW_CFG_CMDLINE_DATA) == b"console=ttyS0 quiet\0"
    assert device.item(fc.FW_CFG_CMDLINE_SIZE) == struct.pack("<I", 20)
    assert device.item(fc.FW_CFG_CMDLINE_ADDR) == struct.pack("<I", 0x20000)
    assert device.item(fc.FW_CFG_SETUP_SIZE) == struct.pack("<I", 1024)
    assert device.item(fc.FW_CFG_SETUP_ADDR) == struct.pack("<I", 0x10000)
    assert device.item(fc.FW_CFG_KERNEL_CMDLINE) == b""  # absent on x86, as in QEMU


def test_boot_items_without_addresses_leave_the_address_items_out(device: FwCfg) -> None:
    device.set_kernel(b"k")
    device.set_cmdline(b"")
    assert device.item(fc.FW_CFG_KERNEL_ADDR) == device.item(fc.FW_CFG_KERNEL_ENTRY) == b""
    assert device.item(fc.FW_CFG_CMDLINE_DATA) == b"\0"
    assert device.item(fc.FW_CFG_CMDLINE_SIZE) == struct.pack("<I", 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.add_item(0x20, b"x"),  # a file's selector
        lambda d: d.add_item(fc.FW_CFG_FILE_DIR, b"x"),
        lambda d: d.add_item(0x4001, b"x"),  # the write channel
        lambda d: d.add_item(0x10000, b"x"),
        lambda d: d.add_file("etc/e820", b"again"),
        lambda d: d.add_file("x" * 56, b""),  # no room for the NUL
        lambda d: d.add_file("", b""),
        lambda d: d.add_file("opt/caf\u00e9", b""),
        lambda d: d.set_kernel(b"k", addr=1 << 32),
        lambda d: d.set_cmdline("a\0b"),
    ],
)
def test_bad_configuration_is_refused(device: FwCfg, call) -> None:
    with pytest.raises(ConfigurationError):
        call(device)


def test_arch_local_items_are_a_table_of_their_own(device: FwCfg) -> None:
    device.add_item(0x8003, b"arch")
    assert device.item(0x8003) == b"arch"
    assert device.item(0x0003) == struct.pack("<Q", 16 * MIB)


# ---- e820 and the file directory ----


def test_e820_below_the_hole(memory: GuestMemory) -> None:
    assert e820_entries(memory) == [
        E820Entry(0, 16 * MIB, fc.E820_RAM),
        E820Entry(0xFFFB_C000, 0x4000, fc.E820_RESERVED),  # KVM's identity map and TSS
    ]


def test_e820_above_4_gib() -> None:
    memory = GuestMemory("5G")
    try:
        assert e820_entries(memory) == [
            E820Entry(0, 3 * GIB, fc.E820_RAM),
            E820Entry(0xFFFB_C000, 0x4000, fc.E820_RESERVED),
            E820Entry(4 * GIB, 2 * GIB, fc.E820_RAM),
        ]
    finally:
        memory.close()


def test_e820_encoding_is_20_packed_bytes_per_entry() -> None:
    encoded = encode_e820([E820Entry(0x1122, 0x3344, 1), E820Entry(1 << 32, 5, 2)])
    assert len(encoded) == 40
    assert encoded[:20] == bytes.fromhex("2211000000000000 4433000000000000 01000000")
    assert struct.unpack_from("<QQI", encoded, 20) == (1 << 32, 5, 2)


def parse_dir(data: bytes) -> list[tuple[str, int, int]]:
    (count,) = struct.unpack_from(">I", data)
    assert len(data) == 4 + 64 * count
    entries = []
    for index in range(count):
        size, select, reserved, name = struct.unpack_from(">IHH56s", data, 4 + 64 * index)
        assert reserved == 0
        assert name.endswith(b"\0")
        entries.append((name.rstrip(b"\0").decode(), select, size))
    return entries


def test_file_directory_is_sorted_by_name_from_0x20(device: FwCfg) -> None:
    assert parse_dir(device.item(fc.FW_CFG_FILE_DIR)) == [("etc/e820", 0x20, 40)]
    assert device.add_file("opt/org.pyvmm/b", b"bee") == 0x21
    assert device.add_file("bootorder", b"/pci@i0cf8\n") == 0x20  # sorts first: renumbers
    assert device.add_file("etc/zz", bytes(300)) == 0x22
    assert parse_dir(device.item(fc.FW_CFG_FILE_DIR)) == [
        ("bootorder", 0x20, 11),
        ("etc/e820", 0x21, 40),
        ("etc/zz", 0x22, 300),
        ("opt/org.pyvmm/b", 0x23, 3),
    ]
    assert device.file_selector("opt/org.pyvmm/b") == 0x23
    assert device.item(0x23) == b"bee"
    assert device.item(0x21) == encode_e820(e820_entries(device.memory))
    assert device.item(0x24) == b""
    with pytest.raises(KeyError):
        device.file_selector("etc/none")


def test_a_55_byte_name_fits(device: FwCfg) -> None:
    name = "opt/" + "n" * 51
    device.add_file(name, b"")
    assert (name, 0x21, 0) in parse_dir(device.item(fc.FW_CFG_FILE_DIR))


# ---- the legacy interface ----


def test_legacy_reads_stream_the_selected_item(bus: Bus, device: FwCfg) -> None:
    assert legacy_read(bus, fc.FW_CFG_SIGNATURE, 4) == b"QEMU"
    # Past the end, reads are 0; re-selecting starts over.
    assert bytes(port_read(bus, DATA) for _ in range(3)) == b"\0\0\0"
    assert legacy_read(bus, fc.FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    assert legacy_read(bus, fc.FW_CFG_RAM_SIZE, 8) == struct.pack("<Q", 16 * MIB)
    # Port 0x510 reads data too, as QEMU's combined region does.
    port_write(bus, SELECTOR, fc.FW_CFG_SIGNATURE, 2)
    assert [port_read(bus, SELECTOR), port_read(bus, DATA)] == [ord("Q"), ord("E")]


def test_the_device_starts_with_the_signature_selected(bus: Bus, device: FwCfg) -> None:
    assert bytes(port_read(bus, DATA) for _ in range(4)) == b"QEMU"


def test_legacy_file_read(bus: Bus, device: FwCfg) -> None:
    assert legacy_read(bus, 0x20, 40) == encode_e820(e820_entries(device.memory))


def test_write_channel_bit_reads_the_same_item_and_data_writes_are_ignored(
    bus: Bus, device: FwCfg
) -> None:
    port_write(bus, SELECTOR, fc.FW_CFG_WRITE_CHANNEL | fc.FW_CFG_SIGNATURE, 2)
    port_write(bus, DATA, 0x41, 1)  # a data write: ignored, offset unchanged
    assert bytes(port_read(bus, DATA) for _ in range(4)) == b"QEMU"
    assert device.item(fc.FW_CFG_SIGNATURE) == b"QEMU"


def test_wide_data_reads_read_zero_and_do_not_advance(bus: Bus, device: FwCfg) -> None:
    port_write(bus, SELECTOR, fc.FW_CFG_SIGNATURE, 2)
    assert port_read(bus, DATA, 2) == 0
    assert port_read(bus, SELECTOR, 4) == 0
    port_write(bus, SELECTOR, 0x01, 4)  # not a word: not a selection
    port_write(bus, SELECTOR, 0x01, 1)  # a data write
    assert port_read(bus, DATA) == ord("Q")


@pytest.mark.parametrize("key", [0x02, 0x1F, 0x21, 0x3FFF, 0x8000, 0xBFFF, 0xFFFF])
def test_absent_items_read_as_zeros(bus: Bus, device: FwCfg, key: int) -> None:
    assert legacy_read(bus, key, 16) == bytes(16)
    assert dma(bus, device.memory, select_read(key), 8) == 0
    assert device.memory.read(BUFFER, 8) == bytes(8)


# ---- the DMA interface ----


def test_dma_signature_reads_qemu_cfg(bus: Bus, device: FwCfg) -> None:
    assert port_read(bus, DMA, 4).to_bytes(4, "little") == b"QEMU"
    assert port_read(bus, DMA + 4, 4).to_bytes(4, "little") == b" CFG"
    assert port_read(bus, DMA + 3, 1) == ord("U")
    assert port_read(bus, DMA + 6, 2).to_bytes(2, "little") == b"FG"


def test_dma_read(bus: Bus, device: FwCfg) -> None:
    memory = device.memory
    memory.fill(BUFFER, 64, 0xAA)
    assert dma(bus, memory, select_read(0x20), 40) == 0
    assert memory.read(BUFFER, 40) == device.item(0x20)
    assert memory.read(BUFFER + 40, 24) == b"\xaa" * 24  # nothing past the length
    # Without SELECT, a read goes on from the current offset; past the end it is zeros.
    memory.fill(BUFFER, 64, 0xAA)
    assert dma(bus, memory, select_read(fc.FW_CFG_SIGNATURE), 2) == 0
    assert dma(bus, memory, fc.FW_CFG_DMA_CTL_READ, 6, target=BUFFER + 2) == 0
    assert memory.read(BUFFER, 10) == b"QEMU\0\0\0\0\xaa\xaa"
    # The legacy port follows the same offset.
    assert port_read(bus, DATA) == 0


def test_dma_skip_then_read(bus: Bus, device: FwCfg) -> None:
    memory = device.memory
    skip = 0x20 << 16 | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_SKIP
    assert dma(bus, memory, skip, 20) == 0
    assert dma(bus, memory, fc.FW_CFG_DMA_CTL_READ, 20) == 0
    assert memory.read(BUFFER, 20) == device.item(0x20)[20:]
    # A skip writes nothing to RAM, even with a bad address, and may go past the end.
    assert dma(bus, memory, fc.FW_CFG_DMA_CTL_SKIP, 1000, target=0xFFFF_0000_0000) == 0
    assert port_read(bus, DATA) == 0


def test_dma_select_only(bus: Bus, device: FwCfg) -> None:
    memory = device.memory
    assert legacy_read(bus, fc.FW_CFG_SIGNATURE, 2) == b"QE"
    # No READ, WRITE or SKIP: the length is ignored; SELECT still selects and rewinds.
    assert dma(bus, memory, fc.FW_CFG_ID << 16 | fc.FW_CFG_DMA_CTL_SELECT, 100) == 0
    assert bytes(port_read(bus, DATA) for _ in range(4)) == b"\x03\0\0\0"


def test_dma_write_is_refused(bus: Bus, device: FwCfg) -> None:
    memory = device.memory
    memory.write(BUFFER, b"EVIL")
    write = fc.FW_CFG_SIGNATURE << 16 | fc.FW_CFG_DMA_CTL_SELECT | fc.FW_CFG_DMA_CTL_WRITE
    assert dma(bus, memory, write, 4) == fc.FW_CFG_DMA_CTL_ERROR
    assert device.item(fc.FW_CFG_SIGNATURE) == b"QEMU"
    assert dma(bus, memory, write, 0) == 0  # nothing to write: no error, as in QEMU


def test_dma_read_into_a_bad_address_sets_error(bus: Bus, device: FwCfg) -> None:
    memory = device.memory
    assert dma(bus, memory, select_read(0x20), 40, target=0xD000_0000) == fc.FW_CFG_DMA_CTL_ERROR
    # Straddling the end of RAM is as bad.
    assert dma(bus, memory, select_read(0x20), 40, target=16 * MIB - 8) == fc.FW_CFG_DMA_CTL_ERROR


def test_dma_control_structure_outside_ram(bus: Bus, device: FwCfg) -> None:
    memory = device.memory
    # Nowhere to write a status: nothing happens, and nothing breaks.
    assert device.dma(0xD000_0000) == fc.FW_CFG_DMA_CTL_ERROR
    start_dma(bus, 0xFFFF_FFFF_FFFF_FFF0)
    # The control field in RAM but the rest not: the error lands in the control field.
    end = 16 * MIB - 4
    memory.write(end, struct.pack(">I", select_read(0)))
    start_dma(bus, end)
    assert memory.read(end, 4) == struct.pack(">I", fc.FW_CFG_DMA_CTL_ERROR)


def test_dma_address_register(bus: Bus, device: FwCfg) -> None:
    memory = device.memory
    memory.write(ACCESS, struct.pack(">IIQ", select_read(fc.FW_CFG_SIGNATURE), 4, BUFFER))
    # A low-half write alone starts a transfer with the high half 0 (its value after each one).
    port_write(bus, DMA + 4, ACCESS, 4, "big")
    assert memory.read(ACCESS, 4) == bytes(4)
    assert memory.read(BUFFER, 4) == b"QEMU"
    # A 64-bit write at 0x514 starts one too (MMIO-style; port I/O cannot do it).
    memory.write(ACCESS, struct.pack(">IIQ", select_read(fc.FW_CFG_ID), 4, BUFFER))
    port_write(bus, DMA, ACCESS, 8, "big")
    assert memory.read(BUFFER, 4) == b"\x03\0\0\0"
    # Other widths and offsets do nothing.
    memory.write(ACCESS, struct.pack(">IIQ", select_read(fc.FW_CFG_SIGNATURE), 4, BUFFER))
    port_write(bus, DMA + 4, 0, 2)
    port_write(bus, DMA + 2, 0, 4)
    port_write(bus, DMA + 4, 0, 8)
    assert memory.read(BUFFER, 4) == b"\x03\0\0\0"


def test_dma_structure_and_buffer_above_4_gib(bus: Bus) -> None:
    memory = GuestMemory("5G")
    try:
        device = FwCfg(bus, memory, cpus=1)
        high = 4 * GIB + 0x1000
        assert dma(bus, memory, select_read(0x20), 60, target=high + 64, at=high) == 0
        assert memory.read(high + 64, 60) == device.item(0x20)
        assert memory.read(high, 16)[:4] == bytes(4)
    finally:
        memory.close()


def test_garbage_from_the_guest_never_raises(bus: Bus, device: FwCfg) -> None:
    memory = device.memory
    rng = random.Random(7)
    ports = [SELECTOR, DATA, 0x512, 0x513, *range(DMA, DMA + 8)]
    for _ in range(3000):
        port = rng.choice(ports)
        if bus.find(port) is None:
            continue
        size = rng.choice([1, 2, 4, 8])
        if rng.random() < 0.5:
            port_read(bus, port, size)
            continue
        if port in (DMA, DMA + 4) and rng.random() < 0.7:
            # A random control structure in RAM, at a random address or in RAM.
            at = rng.choice([ACCESS, rng.getrandbits(64), 16 * MIB - rng.randrange(1, 20)])
            target = rng.choice([BUFFER, rng.getrandbits(64), 16 * MIB - rng.randrange(1, 64)])
            if memory.contains(at, 16):
                control = rng.getrandbits(16) << 16 | rng.getrandbits(5)
                length = rng.choice([0, 1, 40, rng.getrandbits(12)])
                memory.write(at, struct.pack(">IIQ", control, length, target))
            device.dma(at)
        else:
            port_write(bus, port, rng.getrandbits(8 * size), size)
    assert device.item(fc.FW_CFG_SIGNATURE) == b"QEMU"


def test_ports_already_claimed(bus: Bus, memory: GuestMemory) -> None:
    # The exit benchmark's guest claims 0x510-0x51F: fw_cfg cannot share a machine with it.
    bus.add(0x510, 0x10, lambda *access: None, "exits benchmark")
    with pytest.raises(ConfigurationError, match="overlaps"):
        FwCfg(bus, memory, cpus=1)


# ---- the fw_cfg guest on KVM ----


def expected_output(memory: int, cpus: int) -> list[str]:
    low = min(memory, 3 * GIB)
    e820 = [(0, low, 1), (0xFFFB_C000, 0x4000, 2)]
    if memory > low:
        e820.append((4 * GIB, memory - low, 1))
    lines = [
        "signature QEMU id 3 dma signature QEMU CFG",
        f"ram_size {memory:016x} nb_cpus {cpus} max_cpus {cpus}",
        f"file 0020 {20 * len(e820)} etc/e820",
        *(f"e820 {a:016x} {n:016x} {t}" for a, n, t in e820),
    ]
    if memory > low:
        lines.append("dma above 4 GiB ok")
    return [*lines, "dma skip ok, dma write refused", "fw_cfg: all ok"]


def test_machines_have_no_fw_cfg_unless_asked(kvm_required: None) -> None:
    with Machine(memory="16M", serial="none") as machine:
        assert machine.pio.find(0x510) is None
        assert machine.pio.find(0x514) is None


@pytest.mark.parametrize(
    ("memory", "cpus"), [("64M", 1), ("64M", 2), ("5G", 2)], ids=["64M-1cpu", "64M-2cpus", "5G"]
)
def test_fw_cfg_guest(kvm_required: None, memory: str, cpus: int) -> None:
    with Machine(memory=memory, cpus=cpus, serial="capture") as machine:
        machine.load(guest_path("fw_cfg"))
        device = add_fw_cfg(machine)
        result = machine.run(timeout=60)
        size = machine.memory.size
    assert (result.outcome, result.exit_status) == ("exit", 0), result.serial_text
    assert result.serial_text.splitlines() == expected_output(size, cpus)
    # The cost model: one exit per legacy byte (plus one per selection), two per DMA transfer.
    hits = {name: count for _, name, _, count, _ in result.range_hits}
    dir_size = len(device.item(fc.FW_CFG_FILE_DIR))
    e820_size = len(device.item(0x20))
    legacy = [4, 4, 8, 2, 2, 4, dir_size, e820_size]  # bytes after each selection
    assert hits["fw_cfg"] == len(legacy) + sum(legacy) + 1  # + the read past the end
    transfers = 8 + (size > 4 * GIB)  # ram, cpus x2, dir, e820, skip, read, write (+ high)
    assert hits["fw_cfg-dma"] == 2 + 2 * transfers  # + the two signature reads


def test_fw_cfg_guest_without_the_device(run_guest) -> None:
    # Unclaimed ports read as all ones: the guest finds no signature and says so.
    result = run_guest("fw_cfg")
    assert result.exit_status == (1 << 1) | 1
    assert result.serial_text == "FAIL: signature (got ffffffff, want 554d4551)\n"
