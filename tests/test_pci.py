"""PCI logic on this machine: the bus (conf1, ECAM), BAR placement, MSI/MSI-X registers, and
the assigned device's configuration-space emulation over a fake VFIO device.

The fakes here stand in for a device's registers only, to test pure logic; what the kernel's
VFIO stack does is tested in the rig (tests/test_rig_assign.py). The guest test runs on the
real /dev/kvm.
"""

from __future__ import annotations

import errno
import os
import struct

import numpy as np
import pytest

from pyvmm import Machine, guest_path
from pyvmm._native import lib
from pyvmm.bus import Bus
from pyvmm.devices.vfio_pci import VfioPciDevice
from pyvmm.devices.vfio_pci_bars import placement_problem, segments
from pyvmm.irq import GsiRouting
from pyvmm.kvm import Kvm
from pyvmm.memory import GIB, GuestMemory, MemorySlots
from pyvmm.pci import config as pci
from pyvmm.pci.host import ECAM_BASE, PciBus
from pyvmm.pci.msi import MsiCapability, MsixCapability
from pyvmm.pci.resources import PciResources
from pyvmm.vfio import IrqInfo, RegionInfo, VfioIoctlError
from pyvmm.x86 import CpuMode, write_boot_tables


def access(handler, offset: int, size: int, value: int | None = None) -> int:
    data = memoryview(bytearray(size))
    if value is not None:
        data[:] = value.to_bytes(size, "little")
    handler(offset, data, value is not None)
    return int.from_bytes(data, "little")


def test_conf1_and_ecam_reach_the_same_registers() -> None:
    bus = PciBus(Bus("port I/O", 1 << 16), Bus("MMIO", 1 << 52))
    conf1 = bus._conf1
    access(conf1, 0, 4, 1 << 31)  # bus 0, device 0, function 0, register 0
    assert access(conf1, 4, 4) == 0x00081B36
    assert access(conf1, 6, 2) == 0x0008  # 16-bit read of the upper half
    access(conf1, 0, 4, (1 << 31) | 0x08)
    assert access(conf1, 7, 1) == 0x06  # class: bridge
    assert access(bus._ecam, 0, 4) == 0x00081B36
    assert access(bus._ecam, 1 << 15, 4) == 0xFFFFFFFF  # slot 1: nothing there
    access(conf1, 0, 4, (1 << 31) | (1 << 11))
    assert access(conf1, 4, 4) == 0xFFFFFFFF
    access(conf1, 0, 4, 0)  # enable bit off: data port reads all ones
    assert access(conf1, 4, 4) == 0xFFFFFFFF


def test_bar_placement_is_natural_and_spills_above_ram() -> None:
    resources = PciResources(ram_top=64 << 20)
    assert resources.memory(0x100, False) == 0xC000_0000  # at least a page
    assert resources.memory(0x100000, False) == 0xC010_0000  # aligned to its size
    assert resources.io(8) == 0xC000 and resources.io(0x20) == 0xC020
    huge = resources.memory(512 << 20, True)  # does not fit in 256 MiB: above 4 GiB
    assert huge >= 4 * GIB and huge % (512 << 20) == 0
    assert resources.high_top == huge + (512 << 20)
    # The guest's identity map reaches it (one page directory per GiB, from 0x4000).
    memory = GuestMemory("16M")
    write_boot_tables(memory, CpuMode.LONG, resources.high_top)
    directory = memory.view(0x3000 + 8 * (huge // GIB), 8, np.uint64)[0]
    assert directory & 1, "the GiB holding the BAR is mapped"
    memory.close()


def test_msi_capability_registers() -> None:
    raw = bytes([pci.CAP_MSI, 0x50]) + struct.pack("<H", 0x0080 | 0x0100 | 0x6) + bytes(20)
    msi = MsiCapability(raw)
    assert msi.is_64 and msi.maskable and msi.size == 24 and not msi.enabled
    msi.write(4, 4, 0xFEE0_1003)  # the low two bits are reserved
    msi.write(8, 4, 0)
    msi.write(0xC, 2, 0x4030)
    msi.write(2, 2, 0x0011)  # enable, two vectors
    assert msi.enabled and msi.vectors == 2 and msi.address == 0xFEE0_1000
    assert [msi.data(0), msi.data(1)] == [0x4030, 0x4031]
    msi.write(0x10, 4, 0b10)
    assert not msi.masked(0) and msi.masked(1)
    msi.write(2, 2, 0xFFFF)  # read-only bits stay
    assert msi.read(2, 2) & 0x0180 == 0x0180


def test_msix_capability_and_table() -> None:
    raw = bytes([pci.CAP_MSIX, 0]) + struct.pack("<HII", 7, 0x2000 | 0, 0x3000 | 0)
    msix = MsixCapability(raw)
    assert (msix.entries, msix.table_bar, msix.table_offset, msix.pba_offset) == (
        8,
        0,
        0x2000,
        0x3000,
    )
    assert all(msix.entry(i)[2] for i in range(8)), "vectors start masked"
    msix.table[16:32] = list(struct.pack("<IIII", 0xFEE00000, 0, 0x41, 0))
    assert msix.entry(1) == (0xFEE00000, 0x41, False)
    msix.write(2, 2, 0xC000)
    assert msix.enabled and msix.function_masked
    assert msix.read(2, 2) & 0x7FF == 7


def test_msi_multiple_message_enable_never_exceeds_capable() -> None:
    raw = bytes([pci.CAP_MSI, 0]) + struct.pack("<H", 0x0100 | 0x2) + bytes(20)  # 2 vectors
    msi = MsiCapability(raw)
    for enable in range(8):  # 1..32 vectors asked for, and the reserved values 6 and 7
        msi.write(2, 2, enable << 4 | 1)
        assert msi.vectors == min(1 << enable, 2), enable
        assert msi.read(2, 2) >> 4 & 7 == min(enable, 1), "reads back clamped, as QEMU's"
    msi.write(0xC, 4, 0xFFFFFFFF)
    assert msi.read(0xC, 4) == 0b11, "mask bits past the device's vectors are reserved"
    reserved = MsiCapability(bytes([pci.CAP_MSI, 0]) + struct.pack("<H", 0xE) + bytes(20))
    reserved.write(2, 2, 0x71)
    assert reserved.vectors == 32, "a reserved Capable value counts as the largest, 32"


class FakeVfioDevice:
    """Registers of a PCI device as VFIO would show them; records what was asked of it."""

    name = "0000:00:09.0"
    fd = -1

    def __init__(self) -> None:
        self.config = bytearray(256)
        struct.pack_into("<HHHH", self.config, 0, 0x8086, 0x1234, 0, pci.STATUS_CAPABILITIES)
        struct.pack_into("<I", self.config, 0x10, 0x0)  # BAR0: 32-bit memory, 4 KiB
        struct.pack_into("<I", self.config, 0x18, 0xC)  # BAR2: 64-bit prefetchable, 16 KiB
        struct.pack_into("<I", self.config, 0x20, 0x1)  # BAR4: I/O, 32 ports
        self.config[pci.CAPABILITY_POINTER] = 0x40
        self.config[pci.INTERRUPT_PIN] = 1
        self.config[0x40:0x42] = bytes([pci.CAP_POWER_MANAGEMENT, 0x50])
        self.config[0x50:0x52] = bytes([0x09, 0x60])  # vendor-specific: pyvmm hides it
        self.config[0x60:0x64] = bytes([pci.CAP_MSI, 0x70]) + struct.pack("<H", 0x80)
        self.config[0x70:0x7C] = bytes([pci.CAP_MSIX, 0]) + struct.pack("<HII", 3, 0x2, 0x802)
        sizes = {0: 0x1000, 2: 0x4000, 4: 0x20, 7: 0x100}
        self.regions = {}
        for index in range(9):
            self.regions[index] = RegionInfo(index, 3, sizes.get(index, 0), index << 40, ())
        self.irq_calls: list[tuple[int, int, int]] = []
        #: IRQ indexes whose ACTION_TRIGGER with eventfds fails, as VFIO fails it (EINVAL).
        self.refuse: set[int] = set()

    def get_info(self) -> tuple[int, int, int]:
        return lib.VFIO_DEVICE_FLAGS_PCI, 9, 5

    def get_region_info(self, index: int) -> RegionInfo:
        return self.regions[index]

    def get_irq_info(self, index: int) -> IrqInfo:
        return IrqInfo(index, lib.VFIO_IRQ_INFO_EVENTFD, 1)

    def set_irqs(self, index, flags, start=0, count=0, fds=None) -> None:
        if index in self.refuse and flags & lib.VFIO_IRQ_SET_DATA_EVENTFD:
            raise VfioIoctlError("VFIO_DEVICE_SET_IRQS", errno.EINVAL)
        self.irq_calls.append((index, flags, count))

    def read(self, region: int, offset: int, size: int) -> int:
        assert region == lib.VFIO_PCI_CONFIG_REGION_INDEX
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write(self, region: int, offset: int, size: int, value: int) -> None:
        self.config[offset : offset + size] = value.to_bytes(size, "little")

    def close(self) -> None:
        pass


@pytest.fixture
def assigned(kvm_required):
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        pio, mmio = Bus("port I/O", 1 << 16), Bus("MMIO", 1 << 52)
        fake = FakeVfioDevice()
        device = VfioPciDevice(
            fake,
            3,
            vm=vm,
            pio=pio,
            mmio=mmio,
            routing=GsiRouting(vm),
            slots=MemorySlots(1),
            resources=PciResources(64 << 20),
            guest_ram=[(0, 64 << 20)],
        )
        yield device, fake, pio, mmio
        device.close()


def test_capability_list_hides_what_pyvmm_does_not_support(assigned) -> None:
    device, *_ = assigned
    chain, offset = [], device.config_read(pci.CAPABILITY_POINTER, 1)
    while offset:
        chain.append((offset, device.config_read(offset, 1)))
        offset = device.config_read(offset + 1, 1)
    assert chain == [(0x40, 1), (0x60, 5), (0x70, 0x11)]
    assert device.config_read(pci.STATUS, 2) & pci.STATUS_CAPABILITIES
    assert device.config_read(0x100, 4) == 0, "no extended capabilities"


def test_bars_are_placed_and_size_like_hardware(assigned) -> None:
    device, fake, *_ = assigned
    assert device.config_read(pci.COMMAND, 2) == 0, "firmware leaves decoding off"
    bar0 = device.config_read(0x10, 4)
    assert bar0 == 0xC000_0000
    assert device.config_read(0x18, 4) & 0xF == 0xC
    assert device.config_read(0x20, 4) == 0xC001, "I/O BAR in 0xC000-0xFFFF"
    for register, mask in ((0x10, 0xFFFFF000), (0x18, 0xFFFFC00C), (0x1C, 0xFFFFFFFF)):
        device.config_write(register, 4, 0xFFFFFFFF)
        assert device.config_read(register, 4) == mask
    device.config_write(0x20, 4, 0xFFFFFFFF)
    assert device.config_read(0x20, 4) == 0xFFFFFFE1
    assert fake.config[0x10:0x24] != b"\xff" * 20, "BAR writes stay with pyvmm"
    assert device.config_read(pci.INTERRUPT_LINE, 1) == pci.intx_irq(3, 1) == 11


def test_decoding_maps_bars_where_the_guest_put_them(assigned) -> None:
    device, fake, pio, mmio = assigned
    device.config_write(0x20, 4, 0xD000)
    device.config_write(pci.COMMAND, 2, pci.COMMAND_IO | pci.COMMAND_MEMORY)
    assert fake.read(7, pci.COMMAND, 2) == 3, "the command register reaches the device"
    assert pio.find(0xD010) is not None and pio.find(0xC000) is None
    # No region allows mmap here: BAR0 is trapped, BAR2 holds the MSI-X table and PBA.
    assert mmio.find(0xC000_0000).name.endswith("BAR0")
    names = {r.name for r in mmio.ranges}
    assert any("MSI-X table" in name for name in names)
    device.config_write(pci.COMMAND, 2, 0)
    assert pio.find(0xD010) is None and mmio.find(0xC000_0000) is None


def test_msi_enable_moves_the_device_from_intx_to_msi(assigned) -> None:
    device, fake, *_ = assigned
    assert fake.irq_calls[-1][:2] == (
        lib.VFIO_PCI_INTX_IRQ_INDEX,
        lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_UNMASK,
    )
    device.config_write(0x64, 4, 0xFEE00000)
    device.config_write(0x6C, 2, 0x31)
    device.config_write(0x62, 2, 1)
    assert (
        lib.VFIO_PCI_INTX_IRQ_INDEX,
        lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
    ) in fake.irq_calls
    assert fake.irq_calls[-1] == (
        lib.VFIO_PCI_MSI_IRQ_INDEX,
        lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
        1,
    )
    assert device.routing.msi == {24: (0xFEE00000, 0x31)}
    device.config_write(0x6C, 2, 0x32)
    assert device.routing.msi == {24: (0xFEE00000, 0x32)}, "the route follows the data"
    device.config_write(0x62, 2, 0)
    assert device.routing.msi == {}
    assert fake.irq_calls[-2][0] == lib.VFIO_PCI_INTX_IRQ_INDEX, "INTx is back"


class EduRegisters:
    """The two edu registers edu_regs touches, for a guest test of the PCI bus logic."""

    def __init__(self) -> None:
        self.liveness = 0

    def __call__(self, offset: int, data: memoryview, is_write: bool) -> None:
        if is_write:
            self.liveness = int.from_bytes(data, "little")
        else:
            value = 0x010000ED if offset == 0 else ~self.liveness & 0xFFFFFFFF
            data[:] = value.to_bytes(4, "little")


class EduConfig:
    """edu's identity and a BAR0 at a fixed place: enough for the guest to find it."""

    def config_read(self, offset: int, size: int) -> int:
        space = (
            struct.pack("<HHHH", 0x1234, 0x11E8, 0, 0) + bytes(8) + struct.pack("<I", 0xC000_0000)
        )
        return int.from_bytes(space.ljust(256, b"\0")[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass


def test_guest_enumerates_the_bus_through_conf1(kvm_required) -> None:
    with Machine(memory="16M", serial="capture") as machine:
        machine.load(guest_path("edu_regs"))
        slot = machine.add_pci_function(EduConfig())
        machine.add_mmio(0xC000_0000, 0x1000, EduRegisters(), "fake edu BAR0")
        result = machine.run(timeout=60)
    assert slot == 1
    assert result.exit_status == 0, result.serial_text + result.message
    assert "edu_regs: 3000 accesses ok" in result.serial_text
    conf1 = [hits for space, name, _, hits, _ in result.range_hits if name == "PCI conf1"]
    assert conf1 and conf1[0] > 0
    assert ECAM_BASE == 0xE000_0000


def test_msix_table_and_pba_pages_are_trapped_the_rest_mapped(assigned) -> None:
    device, *_ = assigned
    bar = device.bars[2]
    bar.region = RegionInfo(2, 7, 0x4000, 2 << 40, ((0, 0x4000),))  # VFIO: all mappable
    device.msix.table_offset, device.msix.pba_offset = 0x1000, 0x3000
    assert segments(bar, device.msix, mmap_bars=True) == [
        ("mmap", 0, 0x1000),
        ("msix", 0x1000, 0x1000),
        ("mmap", 0x2000, 0x1000),
        ("trap", 0x3000, 0x1000),
    ]
    no_mmap = segments(bar, device.msix, mmap_bars=False)  # --no-mmap
    assert [kind for kind, *_ in no_mmap] == ["trap", "msix", "trap"]


def test_msix_routes_follow_table_writes_and_masks(assigned) -> None:
    device, fake, *_ = assigned
    msix = device.msix
    device.config_write(pci.COMMAND, 2, pci.COMMAND_MEMORY)  # maps the table's window
    msix.table[0:16] = list(struct.pack("<IIII", 0xFEE00000, 0, 0x40, 0))  # vector 0 unmasked
    device.config_write(0x72, 2, 0x8000)  # MSI-X enable
    assert fake.irq_calls[-1] == (
        lib.VFIO_PCI_MSIX_IRQ_INDEX,
        lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
        msix.entries,
    )
    assert [v.attached for v in device.vectors] == [True, False, False, False]
    first = device.vectors[0].gsi
    assert device.routing.msi[first] == (0xFEE00000, 0x40)
    # The guest reprograms vector 0 (the C loop stored it, then handed the write over).
    msix.table[8:12] = list(struct.pack("<I", 0x41))
    device._msix_table_written(8, memoryview(bytearray(4)), True)
    assert device.routing.msi[first] == (0xFEE00000, 0x41)
    msix.table[12] = 1  # per-vector mask
    device._msix_table_written(12, memoryview(bytearray(4)), True)
    assert not device.vectors[0].attached
    msix.table[12] = 0
    device._msix_table_written(12, memoryview(bytearray(4)), True)
    assert device.vectors[0].attached
    device.config_write(0x72, 2, 0xC000)  # function mask
    assert not any(v.attached for v in device.vectors)
    device.config_write(0x72, 2, 0)
    assert device.vectors == [] and device.routing.msi == {}


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_msi_enable_that_vfio_refuses_leaks_nothing_and_warns(assigned) -> None:
    device, fake, *_ = assigned
    fake.refuse.add(lib.VFIO_PCI_MSI_IRQ_INDEX)
    before = open_fds()
    device.config_write(0x64, 4, 0xFEE00000)
    device.config_write(0x6C, 2, 0x31)
    device.config_write(0x62, 2, 1)
    assert device.config_read(0x62, 2) & 1, "the enable bit stays as the guest wrote it"
    assert device.vectors == [] and device.routing.msi == {}, "no vector, no route"
    assert open_fds() == before, "the vector's eventfd is closed"
    assert fake.irq_calls[-2][:2] == (
        lib.VFIO_PCI_INTX_IRQ_INDEX,
        lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
    ), "INTx is wired again, as QEMU falls back"
    [warning] = device.warning_lines()
    assert "MSI enable with 1 vectors failed: VFIO_DEVICE_SET_IRQS failed: EINVAL" in warning
    assert "\n" not in warning
    device.config_write(0x6C, 2, 0x32)  # while "enabled": no retry, no second warning
    assert len(device.warning_lines()) == 1
    fake.refuse.clear()
    device.config_write(0x62, 2, 0)
    device.config_write(0x62, 2, 1)  # a new edge: it works now, on a recycled GSI
    assert device.active_irq == lib.VFIO_PCI_MSI_IRQ_INDEX
    assert device.routing.msi == {24: (0xFEE00000, 0x32)}


def test_msix_enable_that_vfio_refuses_releases_every_vector(assigned) -> None:
    device, fake, *_ = assigned
    fake.refuse.add(lib.VFIO_PCI_MSIX_IRQ_INDEX)
    before = open_fds()
    device.config_write(0x72, 2, 0x8000)
    assert device.vectors == [] and device.routing.msi == {}
    assert open_fds() == before
    assert "MSI-X enable with 4 vectors failed" in device.warning_lines()[0]
    assert sorted(device.routing._free) == [24, 25, 26, 27], "the GSIs are free again"


def test_placement_problems_name_what_is_in_the_way() -> None:
    ram = [(0, 64 << 20, "guest RAM")]
    assert placement_problem(0xC000_0000, 0x1000, ram, 48) is None
    assert "overlaps guest RAM [0x0, 0x4000000)" in placement_problem(0x10_0000, 0x1000, ram, 48)
    assert "48-bit" in placement_problem(0xFFFF_FFFF_0000_0000, 0x1000, ram, 48)
    assert placement_problem((1 << 48) - 0x1000, 0x1000, ram, 48) is None


def test_bar_moves_onto_taken_places_are_refused_and_moving_back_works(assigned) -> None:
    device, _, pio, mmio = assigned
    mmio.add(0xD000_0000, 0x1000, lambda *_: None, "a platform window")
    pio.add(0x3F8, 8, lambda *_: None, "COM1")
    device.config_write(pci.COMMAND, 2, pci.COMMAND_IO | pci.COMMAND_MEMORY)
    assert mmio.find(0xC000_0000).name.endswith("BAR0")
    for place in (0x10_0000, 0xD000_0000, 0xFEE0_0000, 0xFEC0_0000, 0xFFFF_0000):
        device.config_write(0x10, 4, place)
        found = mmio.find(place)
        assert found is None or "BAR0" not in found.name, hex(place)
        assert mmio.find(0xC000_0000) is None, "not decoded at the old place either"
        assert device.config_read(0x10, 4) == place, "the register holds what the guest wrote"
    device.config_write(0x10, 4, 0xC000_0000)
    assert mmio.find(0xC000_0000).name.endswith("BAR0"), "back at a free place: mapped"
    device.config_write(0x1C, 4, 0xFFFF_FFFF)  # BAR2's upper half: beyond any address width
    assert not any("BAR2" in r.name or "MSI-X" in r.name for r in mmio.ranges)
    device.config_write(0x1C, 4, 0)
    assert any("MSI-X" in r.name for r in mmio.ranges)
    device.config_write(0x20, 4, 0x3F8)  # the I/O BAR onto COM1's ports
    assert pio.find(0x3F8).name == "COM1"
    device.config_write(0x20, 4, 0xD000)
    assert pio.find(0xD000).name.endswith("BAR4")
    warnings = device.warning_lines()
    assert len(warnings) == 7 and all("refused" in line for line in warnings), warnings
    assert "overlaps guest RAM" in warnings[0] and "overlaps a platform window" in warnings[1]
    device.config_write(0x10, 4, 0x10_0000)
    device.config_write(0x10, 4, 0x10_0000)
    assert len(device.warning_lines()) == 7, "the same refusal is one warning"


def test_a_flood_of_refusals_is_a_bounded_list_of_lines(assigned) -> None:
    device, *_ = assigned
    device.config_write(pci.COMMAND, 2, pci.COMMAND_MEMORY)
    for page in range(40):
        device.config_write(0x10, 4, 0x20_0000 + page * 0x1000)
    lines = device.warning_lines()
    assert len(lines) == 17 and lines[-1].endswith("24 more warnings like these"), lines[-1]


class ScratchConfig:
    """A function whose 4 KiB of configuration space keep whatever is written: no rules."""

    def __init__(self) -> None:
        self.space = bytearray(pci.ECAM_FUNCTION_SIZE)
        struct.pack_into("<HH", self.space, 0, 0x1B36, 0x00FF)
        self.writes = 0

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.space[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self.space[offset : offset + size] = value.to_bytes(size, "little")


def test_cfg_fuzz_guest_writes_every_register_and_ends_with_its_status(
    kvm_required, tmp_path
) -> None:
    from tests.test_rig_config_fuzz import FUZZ_DONE_STATUS, fuzz_image

    function = ScratchConfig()
    with Machine(memory="16M", serial="capture") as machine:
        machine.load(fuzz_image(7, tmp_path))
        machine.add_pci_function(function)
        result = machine.run(timeout=120)
    assert result.exit_status == FUZZ_DONE_STATUS, result.serial_text + result.message
    assert "cfg_fuzz: dev 00:01.0 00ff1b36, seed 7" in result.serial_text
    counts = result.serial_text.rsplit("seed 7: ", 1)[1]
    writes = int(counts.split()[0])
    assert writes == function.writes > 2 * 0x100 // 4, counts


def test_nothing_decodes_in_d3hot_where_vfio_revokes_the_bars(assigned) -> None:
    device, _, pio, mmio = assigned
    device.config_write(pci.COMMAND, 2, pci.COMMAND_IO | pci.COMMAND_MEMORY)
    assert mmio.find(0xC000_0000) is not None and pio.find(0xC000) is not None
    device.config_write(0x44, 2, 3)  # PM control: D3hot
    assert mmio.find(0xC000_0000) is None and pio.find(0xC000) is None
    device.config_write(0x44, 1, 0)  # D0 again
    assert mmio.find(0xC000_0000).name.endswith("BAR0")
