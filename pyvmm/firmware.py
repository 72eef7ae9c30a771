"""pyvmm's own firmware (firmware/): the ROM at the top of 4 GiB, and the boot it finds in fw_cfg.

``pyvmm run KERNEL --firmware`` boots through a firmware instead of entering the kernel
directly. The boot CPU starts where a real CPU does, at the reset vector 0xFFFFFFF0 in real
mode, and firmware/pyvmm-fw.S takes it from there to the kernel's entry. What pyvmm does:

1. Maps the 64 KiB firmware image at 0xFFFF0000 in a memory slot of its own, read-only
   where KVM can (KVM_MEM_READONLY). There is no alias below 1 MiB: the firmware never
   far-jumps in real mode, so CS keeps its reset base 0xFFFF0000 until protected mode,
   and 0xF0000 stays RAM, where the MP table is.
2. Loads the kernel with its boot protocol's loader as for a direct boot, but into a
   staging copy of guest RAM instead of guest RAM (``Firmware.staging``): the multiboot
   information, the zero page, the ACPI and MP tables are built exactly as on the direct
   path. No boot GDT or page tables: the firmware builds its own.
3. Publishes the boot in fw_cfg (``Firmware.publish``): each piece of the kernel that must
   be in RAM is a "blob", an fw_cfg item and the address it goes to, and the file
   etc/pyvmm/boot is the boot record: the protocol, the CPU mode, the entry point and
   registers, and the blob list. The firmware finds the record in the fw_cfg directory and
   copies each blob with one DMA transfer. For Linux the kernel, initrd and command line
   are the standard fw_cfg items QEMU's own Linux loader reads; the rest are files.
4. Leaves the boot CPU in KVM's reset state (only its CPUID is set: that is the CPU model,
   not state). Other vCPUs are what the direct path makes them: for multiboot and Linux
   they wait for the kernel's INIT/SIPI; for pyvmm's ELF ABI they run the firmware from
   the reset vector too and wait in it until the boot CPU has loaded the kernel.

firmware/README.md has the record's layout and the firmware's RAM use; docs/guest-abi.md
("Firmware") what a kernel finds.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyvmm.acpi import ACPI_AREA_END, RSDP_ADDRESS
from pyvmm.boot import BootPlan, BootProtocol
from pyvmm.devices.fw_cfg import (
    FW_CFG_CMDLINE_DATA,
    FW_CFG_INITRD_DATA,
    FW_CFG_KERNEL_DATA,
    FwCfg,
)
from pyvmm.errors import ConfigurationError, GuestImageError
from pyvmm.imagefile import open_regular
from pyvmm.ioctl import Cdata
from pyvmm.kvm import Vcpu, Vm
from pyvmm.layout import (
    BOOT_PAGE,
    FIRMWARE_RECORD,
    FIRMWARE_WORK_AREA,
    PAGE_DIRECTORIES_START,
    boot_regions,
    check_layout,
    plan_identity_map,
)
from pyvmm.linux import COMMAND_LINE, LINUX_GDT
from pyvmm.memory import PAGE_SIZE, GuestMemory, MemorySlots
from pyvmm.mptable import FLOATING_POINTER_ADDRESS, MP_AREA_END
from pyvmm.multiboot import BOOT_LOADER_NAME, INFO_SIZE
from pyvmm.x86 import CpuMode, model_msrs, vcpu_cpuid

#: The image: the last 64 KiB below 4 GiB, the reset vector 16 bytes from its end.
ROM_SIZE = 0x10000
ROM_BASE = (1 << 32) - ROM_SIZE
#: Bytes 0xFFF8-0xFFFE of the image; byte 0xFFFF makes all bytes sum to 0 mod 256.
SIGNATURE = b"PYVMMFW"
SIGNATURE_OFFSET = 0xFFF8
#: The image pip install builds from firmware/ and bundles with pyvmm.
BUNDLED_IMAGE = Path(__file__).resolve().parent / "firmware_images" / "pyvmm-fw.bin"

#: From linux/kvm.h: a memory slot the guest can read and execute but not write.
KVM_CAP_READONLY_MEM = 31
KVM_MEM_READONLY = 1 << 1

BOOT_FILE = "etc/pyvmm/boot"
BOOT_MAGIC = b"PYVMBOOT"
#: magic, protocol, mode, blob count, identity map GiB, GDT address, 0, entry, RAX, RBX,
#: RSI, 0: 64 bytes, then the blobs.
RECORD = struct.Struct("<8sBBHIIIQQQQQ")
#: address, length, fw_cfg selector, 0.
BLOB = struct.Struct("<QIHH")
PROTOCOL_CODES = {BootProtocol.ELF: 0, BootProtocol.MULTIBOOT: 1, BootProtocol.LINUX: 2}
MODE_CODES = {CpuMode.LONG: 0, CpuMode.PROTECTED: 1}

#: The firmware's RAM (firmware/pyvmm-fw.S, layout.py): the boot page, where the record is
#: read to, and the identity map from 0x2000 (a page directory per GiB from 0x4000).
RECORD_ADDRESS, RECORD_END = FIRMWARE_RECORD.start, FIRMWARE_RECORD.end
MAX_BLOBS = (RECORD_END - RECORD_ADDRESS - RECORD.size) // BLOB.size
#: The firmware maps this much for itself: RAM below the hole and its own ROM.
FIRMWARE_MAP_GIB = 4
#: Registers a boot protocol may set that the record carries (the rest are 0, RDI the index).
RECORD_REGISTERS = ("rax", "rbx", "rsi")


@dataclass(frozen=True)
class Blob:
    """A piece of the boot the firmware copies into RAM: length bytes of an fw_cfg item.

    length may exceed the item's size: fw_cfg DMA reads past the end as zeros (a bss).
    """

    name: str  #: the fw_cfg file, or the standard item's name
    address: int
    length: int
    selector: int


def read_image(path: str | Path) -> bytes:
    """Read and check a firmware image: 64 KiB, pyvmm's signature, bytes summing to 0."""
    path = Path(path)
    hint = " (pip install builds it from firmware/)" if path == BUNDLED_IMAGE else ""
    with open_regular(path, "firmware image", hint) as file:
        try:
            image = file.read(ROM_SIZE + 1)  # one more than a ROM: enough to refuse a larger file
        except OSError as error:
            raise GuestImageError(f"cannot read firmware image {path}: {error.strerror}") from None
    if len(image) != ROM_SIZE:
        raise GuestImageError(
            f"firmware image {path} is {'over ' if len(image) > ROM_SIZE else ''}"
            f"{min(len(image), ROM_SIZE)} bytes, not {ROM_SIZE}: not a pyvmm "
            "firmware image (make -C firmware builds one)"
        )
    if image[SIGNATURE_OFFSET : SIGNATURE_OFFSET + len(SIGNATURE)] != SIGNATURE:
        raise GuestImageError(
            f"firmware image {path} lacks the signature {SIGNATURE.decode()} at "
            f"{SIGNATURE_OFFSET:#x}: not a pyvmm firmware image (make -C firmware builds one)"
        )
    if sum(image) % 256:
        raise GuestImageError(
            f"firmware image {path} is corrupt: its bytes do not sum to 0 mod 256: "
            "rebuild it (make -C firmware) or copy it again"
        )
    return image


def map_size_gib(plan: BootPlan, memory: GuestMemory, device_top: int = 0) -> int:
    """GiB of identity map the kernel is entered with: as x86.write_boot_tables maps them
    for long mode; for protected mode (paging off) what the firmware maps for itself."""
    if plan.mode is not CpuMode.LONG:
        check_layout(boot_regions(plan.protocol.value, FIRMWARE_MAP_GIB))
        return FIRMWARE_MAP_GIB
    return plan_identity_map(plan.protocol.value, memory.top, device_top)


class Firmware:
    """The firmware ROM of a Machine, its staging RAM, and the boot it publishes."""

    def __init__(
        self, vm: Vm, slots: MemorySlots, memory: GuestMemory, path: str | Path | None = None
    ) -> None:
        """Check the image at path (default: the bundled one) and map it at ROM_BASE."""
        self.path = Path(path) if path is not None else BUNDLED_IMAGE
        image = read_image(self.path)
        self._rom = mmap.mmap(-1, ROM_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._rom[:] = image
        self._rom_array = np.frombuffer(self._rom, dtype=np.uint8)
        #: Where the kernel is loaded and its boot information built, for publish().
        self.staging = GuestMemory(memory.size)
        self.read_only = bool(vm.kvm.check_extension(KVM_CAP_READONLY_MEM))
        # Without KVM_MEM_READONLY the ROM is plain memory: a guest write changes it.
        flags = KVM_MEM_READONLY if self.read_only else 0
        vm.set_user_memory_region(
            slots.allocate(), ROM_BASE, ROM_SIZE, self._rom_array.ctypes.data, flags
        )
        self.blobs: list[Blob] = []

    def check(self, plan: BootPlan) -> None:
        """Refuse what the firmware cannot enter: real mode (its RAM holds the firmware),
        and a kernel below 1 MiB that it would load over its own RAM and page tables."""
        if plan.mode not in MODE_CODES:
            raise ConfigurationError(
                f"--firmware enters a guest in long or protected mode, not {plan.mode.value}: "
                "boot a real-mode guest without --firmware"
            )
        spans = [(s.guest_phys_addr, s.guest_phys_addr + s.memory_size)
                 for s in plan.image.segments]  # fmt: skip
        if plan.multiboot is not None:
            spans += [(m.start, m.end) for m in plan.multiboot.modules]
            spans += [(r.start, r.end) for r in plan.multiboot.regions[1:]]
            spans.append(plan.multiboot.after_image)
        area = FIRMWARE_WORK_AREA
        for start, end in spans:
            if start < area.end and area.start < end:
                raise GuestImageError(
                    f"{plan.image.path}: with --firmware, [{start:#x}, {end:#x}) of the kernel "
                    f"and its boot information would overwrite {area.name} "
                    f"[{area.start:#x}, {area.end:#x}) while the firmware runs: link the kernel "
                    f"at or above {area.end:#x}, or boot it without --firmware"
                )

    def publish(
        self, fw_cfg: FwCfg, plan: BootPlan, cpus: int, *, device_top: int = 0, tables: bool
    ) -> bytes:
        """Add the blobs and the boot record to fw_cfg; returns the record's bytes.

        tables: the staging RAM holds ACPI and MP tables to copy too. device_top is the
        end of any BAR placed above RAM, which the kernel's identity map must cover.
        """
        staging = self.staging
        files: list[tuple[str, int, bytes, int]] = []  # name, address, data, length
        items: list[tuple[str, int, int, int]] = []  # name, address, length, selector
        for index, segment in enumerate(plan.image.segments):
            data = staging.read(segment.guest_phys_addr, segment.file_size)
            files.append((f"etc/pyvmm/segment{index}", segment.guest_phys_addr, data,
                          segment.memory_size))  # fmt: skip
        if plan.multiboot is not None:
            files += _multiboot_files(plan, staging)
        if plan.linux is not None:
            linux = plan.linux
            files.append(("etc/pyvmm/zero-page", linux.zero_page,
                          staging.read(linux.zero_page, PAGE_SIZE), PAGE_SIZE))  # fmt: skip
            # The standard items QEMU's linuxboot_dma.bin option ROM reads, set by the
            # Machine as for a direct boot: the same bytes the direct path loads.
            items.append(("kernel", linux.load_address, linux.kernel_size, FW_CFG_KERNEL_DATA))
            cmdline = fw_cfg.item(FW_CFG_CMDLINE_DATA)
            items.append(("cmdline", COMMAND_LINE, len(cmdline), FW_CFG_CMDLINE_DATA))
            if linux.initrd is not None:
                items.append(("initrd", *linux.initrd, FW_CFG_INITRD_DATA))
        if tables:
            for name, start, end in (
                ("etc/pyvmm/acpi", RSDP_ADDRESS, ACPI_AREA_END),
                ("etc/pyvmm/mptable", FLOATING_POINTER_ADDRESS, MP_AREA_END),
            ):
                files.append((name, start, staging.read(start, end - start), end - start))

        for name, _, data, _ in files:
            fw_cfg.add_file(name, data)
        # Files are numbered in name order: adding the record renumbers those after it.
        blobs = [
            Blob(name, address, length, fw_cfg.file_selector(name) + (BOOT_FILE < name))
            for name, address, _, length in files
        ]
        blobs += [Blob(*item) for item in items]
        map_gib = map_size_gib(plan, staging, device_top)
        _check_blobs(blobs, map_gib)

        registers = {"rax": 0, "rbx": 0, "rsi": cpus}
        for name, value in plan.registers.items():
            if name not in RECORD_REGISTERS:  # a guard for future protocols
                raise ConfigurationError(f"the firmware cannot pass {name} to the kernel")
            registers[name] = value
        record = RECORD.pack(
            BOOT_MAGIC,
            PROTOCOL_CODES[plan.protocol],
            MODE_CODES[plan.mode],
            len(blobs),
            map_gib,
            LINUX_GDT if plan.protocol is BootProtocol.LINUX else plan.gdt.start,
            0,
            plan.image.entry,
            registers["rax"],
            registers["rbx"],
            registers["rsi"],
            0,
        ) + b"".join(BLOB.pack(b.address, b.length, b.selector, 0) for b in blobs)
        fw_cfg.add_file(BOOT_FILE, record)
        self.blobs = blobs
        return record

    def start_vcpu(self, vcpu: Vcpu, index: int, supported_cpuid: Cdata) -> None:
        """Leave a vCPU in its reset state, to run the firmware from the reset vector.

        Only the CPU model is set: CPUID, with the vCPU index as APIC ID (the firmware tells
        the boot CPU (0) from the others by it, and KVM allows long mode only where CPUID
        says LM), and the microcode revision.
        """
        vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, index))
        vcpu.set_msrs(model_msrs())

    def close(self) -> None:
        """Release the staging RAM and the ROM's host memory (after the vCPUs are gone)."""
        self.staging.close()
        self._rom_array = np.empty(0, dtype=np.uint8)
        try:
            self._rom.close()
        except BufferError:
            pass  # a view is still held: the mapping goes when it does


def _multiboot_files(plan: BootPlan, staging: GuestMemory) -> list[tuple[str, int, bytes, int]]:
    """The multiboot boot information: map and structure, module list and strings, modules."""
    info = plan.multiboot
    files = []
    start, end = info.mmap_address, info.address + INFO_SIZE
    files.append(("etc/pyvmm/multiboot-info", start,
                  staging.read(start, end - start), end - start))  # fmt: skip
    # The module list at mods_addr, then every string: the modules', the command line and
    # the boot loader name, wherever multiboot.py put them after it.
    mbi = staging.read(info.address, INFO_SIZE)
    cmdline, _, mods_addr = struct.unpack_from("<3I", mbi, 16)
    (loader_name,) = struct.unpack_from("<I", mbi, 64)
    strings: Sequence[tuple[int, str]] = [
        *((module.string_address, module.string) for module in info.modules),
        (cmdline, info.cmdline),
        (loader_name, BOOT_LOADER_NAME),
    ]
    end = max(address + len(os.fsencode(text)) + 1 for address, text in strings)
    files.append(("etc/pyvmm/multiboot-strings", mods_addr,
                  staging.read(mods_addr, end - mods_addr), end - mods_addr))  # fmt: skip
    for index, module in enumerate(info.modules):
        length = module.end - module.start
        files.append((f"etc/pyvmm/module{index}", module.start,
                      staging.read(module.start, length), length))  # fmt: skip
    return files


def _check_blobs(blobs: list[Blob], map_gib: int) -> None:
    """Guard: no protocol puts anything where the firmware keeps its data and page tables."""
    if len(blobs) > MAX_BLOBS:
        raise ConfigurationError(
            f"the boot has {len(blobs)} pieces for the firmware to load, more than the "
            f"{MAX_BLOBS} its boot record holds: use fewer --initrd modules"
        )
    reserved_end = PAGE_DIRECTORIES_START + map_gib * PAGE_SIZE
    for blob in blobs:
        if blob.address < reserved_end and BOOT_PAGE < blob.address + blob.length:
            raise ConfigurationError(
                f"{blob.name} at [{blob.address:#x}, {blob.address + blob.length:#x}) overlaps "
                f"the firmware's RAM [{BOOT_PAGE:#x}, {reserved_end:#x})"
            )
