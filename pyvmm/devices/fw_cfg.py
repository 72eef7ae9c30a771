"""QEMU's firmware configuration device (fw_cfg) on port I/O: legacy and DMA interfaces.

Firmware and test kernels written for QEMU find their configuration here: a signature, the RAM
size, the CPU counts, the kernel, initrd and command line of a direct boot, and named files
such as ``etc/e820``. The layout follows QEMU's docs/specs/fw_cfg.rst and
include/standard-headers/linux/qemu_fw_cfg.h:

* selector, port 0x510: a 16-bit write picks an item and rewinds it to offset 0;
* data, port 0x511 (0x510 too): each 8-bit read returns the next byte of the item, 0 past
  its end. Writes to it are ignored, as in QEMU since v2.4;
* DMA address, ports 0x514-0x51B: the guest-physical address of a ``FWCfgDmaAccess``
  {be32 control, be32 length, be64 address}, written big-endian, the high half at 0x514
  first, then the low half at 0x518, which starts the transfer. Reading it returns
  "QEMU CFG", so a guest can tell the DMA interface is there.

The device is not on every machine: the exit benchmark's guest (guests/exits.S) uses ports
0x510-0x51F for itself. A machine gets it from ``add_fw_cfg(machine)``.

Each legacy data read is one exit into Python (there is no native handler that advances an
offset), so a guest that streams a file through port 0x511 pays one exit per byte: 40 for the
etc/e820 of a machine with RAM below 3 GiB, 60 with RAM above 4 GiB, plus one for the
selector. That is why the DMA interface exists: one transfer of any length costs the two
writes of its address (one, for a control structure below 4 GiB whose high half is already 0).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from pyvmm.bus import Bus
from pyvmm.errors import ConfigurationError
from pyvmm.layout import VMX_IDENTITY_MAP, VMX_TSS
from pyvmm.memory import GuestMemory

if TYPE_CHECKING:  # machine.py may import this module: no cycle at run time
    from pyvmm.machine import Machine

#: Ports, as on QEMU's x86 machines.
FW_CFG_SELECTOR_PORT = 0x510
FW_CFG_DATA_PORT = 0x511
FW_CFG_DMA_PORT = 0x514

#: Selector keys of the well-known items (QEMU's qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
#: Files take the selectors from here up, in the order of their names.
FW_CFG_FILE_FIRST = 0x20

#: Selector bit 14: "write channel". QEMU ignores it for reads, and so does pyvmm; no item
#: can be written (data port writes are ignored, DMA writes fail).
FW_CFG_WRITE_CHANNEL = 0x4000
#: Selector bit 15: architecture-specific items, a second table of keys.
FW_CFG_ARCH_LOCAL = 0x8000

#: FW_CFG_ID bits.
FW_CFG_VERSION = 0x01  #: the traditional (selector/data) interface: always there
FW_CFG_VERSION_DMA = 0x02

#: FWCfgDmaAccess.control bits.
FW_CFG_DMA_CTL_ERROR = 0x01
FW_CFG_DMA_CTL_READ = 0x02
FW_CFG_DMA_CTL_SKIP = 0x04
FW_CFG_DMA_CTL_SELECT = 0x08
FW_CFG_DMA_CTL_WRITE = 0x10

#: What the DMA address register reads as: "QEMU CFG", most significant byte first.
FW_CFG_DMA_SIGNATURE = 0x51454D5520434647

#: A directory entry's name field, NUL included.
FW_CFG_MAX_FILE_PATH = 56

#: e820 types (ACPI's address range types).
E820_RAM = 1
E820_RESERVED = 2

_DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address
_DIR_ENTRY = struct.Struct(f">IHH{FW_CFG_MAX_FILE_PATH}s")  # size, select, reserved, name
_E820_ENTRY = struct.Struct("<QQI")  # address, length, type: 20 bytes, packed
_SIGNATURE_BYTES = FW_CFG_DMA_SIGNATURE.to_bytes(8, "big")
_U32_MAX = 0xFFFF_FFFF


class E820Entry(NamedTuple):
    """One range of the e820 memory map."""

    address: int
    length: int
    type: int


def e820_entries(memory: GuestMemory) -> list[E820Entry]:
    """The memory map QEMU's etc/e820 gives for this RAM layout, sorted by address.

    Every RAM region is one usable range (QEMU too lists [0, RAM below the hole) whole: the
    legacy holes below 1 MiB are the firmware's business). Like QEMU under KVM, the pages KVM
    keeps for Intel VMX's real-mode TSS and identity map are reserved, so nothing puts a
    device there. QEMU lists that range first, in the order it was added; pyvmm sorts.
    """
    entries = [E820Entry(r.guest_phys_addr, r.size, E820_RAM) for r in memory.regions]
    # The identity map is one page and the TSS three (KVM's RMODE_TSS_SIZE rounds up to 3).
    start = min(VMX_IDENTITY_MAP.start, VMX_TSS.start)
    end = max(VMX_IDENTITY_MAP.end, VMX_TSS.end)
    entries.append(E820Entry(start, end - start, E820_RESERVED))
    return sorted(entries)


def encode_e820(entries: Iterable[E820Entry]) -> bytes:
    """etc/e820's bytes: {le64 address, le64 length, le32 type} per entry, packed."""
    return b"".join(_E820_ENTRY.pack(*entry) for entry in entries)


def encode_file_dir(files: Iterable[tuple[str, int, int]]) -> bytes:
    """FW_CFG_FILE_DIR's bytes for (name, selector, size) triples, in the order given.

    A be32 count, then per file {be32 size, be16 select, be16 reserved, char name[56]}.
    """
    files = list(files)
    entries = [
        _DIR_ENTRY.pack(size, select, 0, name.encode("ascii")) for name, select, size in files
    ]
    return struct.pack(">I", len(files)) + b"".join(entries)


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _u32(value: int, what: str = "value") -> bytes:
    if not 0 <= value <= _U32_MAX:
        raise ConfigurationError(f"fw_cfg: {what} {value:#x} does not fit in 32 bits")
    return value.to_bytes(4, "little")


class FwCfg:
    """The fw_cfg device: its items and files, the guest's selection, and the port handlers.

    Items are byte strings, served as they are; the integer ones are little-endian, as
    QEMU's fw_cfg_add_i16/i32/i64 store them. Several vCPUs may use the device at once: a
    lock keeps each access whole, as QEMU's big lock does.
    """

    def __init__(
        self,
        pio: Bus,
        memory: GuestMemory,
        *,
        cpus: int,
        max_cpus: int | None = None,
        base: int = FW_CFG_SELECTOR_PORT,
        dma_base: int = FW_CFG_DMA_PORT,
    ) -> None:
        """Create the device with QEMU's standard items and etc/e820, and claim its ports.

        cpus is FW_CFG_NB_CPUS, the CPUs that boot; max_cpus is FW_CFG_MAX_CPUS (QEMU's x86
        machines give one more than the highest APIC ID), by default cpus.
        """
        self.memory = memory
        self._items: dict[int, bytes] = {}
        self._files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._selected = 0
        self._data = b""
        self._offset = 0
        self._dma_address = 0
        self.add_item(FW_CFG_SIGNATURE, b"QEMU")
        self.add_item(FW_CFG_ID, _u32(FW_CFG_VERSION | FW_CFG_VERSION_DMA))
        self.add_item(FW_CFG_RAM_SIZE, memory.size.to_bytes(8, "little"))
        self.add_item(FW_CFG_NB_CPUS, _u16(cpus))
        self.add_item(FW_CFG_MAX_CPUS, _u16(cpus if max_cpus is None else max_cpus))
        self.add_file("etc/e820", encode_e820(e820_entries(memory)))
        self.select(FW_CFG_SIGNATURE)  # QEMU's reset state
        # The selector and data ports as one range, as QEMU's "fwcfg" region: a byte read of
        # either returns data, and a word write to the first selects.
        pio.add(base, 2, self.io_access, "fw_cfg")
        pio.add(dma_base, 8, self.dma_access, "fw_cfg-dma")

    # ---- what the VMM configures ----

    def add_item(self, key: int, data: bytes) -> None:
        """Set the item at selector key (below 0x20, or architecture-specific) to data."""
        index = key & ~FW_CFG_ARCH_LOCAL
        if not 0 <= key <= 0xFFFF or key & FW_CFG_WRITE_CHANNEL:
            raise ConfigurationError(f"fw_cfg: {key:#x} is not a selector key")
        if key == FW_CFG_FILE_DIR or (not key & FW_CFG_ARCH_LOCAL and index >= FW_CFG_FILE_FIRST):
            raise ConfigurationError(f"fw_cfg: key {key:#x} belongs to the files: use add_file")
        if len(data) > _U32_MAX:
            raise ConfigurationError(f"fw_cfg: item {key:#x} is larger than 4 GiB")
        self._items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named file to the directory; returns its selector as things stand.

        Files are listed by name and numbered in that order from 0x20 up, as QEMU does, so
        adding a file whose name sorts first renumbers the others: look a selector up with
        file_selector() once all files are in (guests find files through the directory).
        """
        encoded = name.encode("ascii", errors="replace")
        if not name or not name.isascii() or b"\0" in encoded:
            raise ConfigurationError(f"fw_cfg: bad file name {name!r}: use plain ASCII")
        if len(encoded) >= FW_CFG_MAX_FILE_PATH:
            raise ConfigurationError(
                f"fw_cfg: file name {name!r} is longer than {FW_CFG_MAX_FILE_PATH - 1} bytes"
            )
        if name in self._files:
            raise ConfigurationError(f"fw_cfg: file {name!r} exists already")
        if len(data) > _U32_MAX:
            raise ConfigurationError(f"fw_cfg: file {name!r} is larger than 4 GiB")
        if FW_CFG_FILE_FIRST + len(self._files) >= FW_CFG_WRITE_CHANNEL:
            raise ConfigurationError("fw_cfg: no selector left for another file")
        self._files[name] = bytes(data)
        return self.file_selector(name)

    def file_selector(self, name: str) -> int:
        """The selector of a file (KeyError if there is none)."""
        if name not in self._files:
            raise KeyError(name)
        return FW_CFG_FILE_FIRST + self._file_names().index(name)

    def _file_names(self) -> list[str]:
        # strcmp order, as QEMU sorts: by the bytes of the (ASCII) names.
        return sorted(self._files)

    def set_kernel(self, data: bytes, addr: int | None = None, entry: int | None = None) -> None:
        """FW_CFG_KERNEL_DATA and _SIZE, and _ADDR and _ENTRY where given (le32 each).

        For a Linux bzImage QEMU gives the protected-mode part here (the setup sectors go to
        set_setup); for multiboot, the image and its entry point.
        """
        self.add_item(FW_CFG_KERNEL_SIZE, _u32(len(data), "kernel size"))
        self.add_item(FW_CFG_KERNEL_DATA, data)
        if addr is not None:
            self.add_item(FW_CFG_KERNEL_ADDR, _u32(addr, "kernel address"))
        if entry is not None:
            self.add_item(FW_CFG_KERNEL_ENTRY, _u32(entry, "kernel entry"))

    def set_initrd(self, data: bytes, addr: int | None = None) -> None:
        """FW_CFG_INITRD_DATA and _SIZE, and _ADDR where given (le32 each)."""
        self.add_item(FW_CFG_INITRD_SIZE, _u32(len(data), "initrd size"))
        self.add_item(FW_CFG_INITRD_DATA, data)
        if addr is not None:
            self.add_item(FW_CFG_INITRD_ADDR, _u32(addr, "initrd address"))

    def set_cmdline(self, cmdline: str | bytes, addr: int | None = None) -> None:
        """FW_CFG_CMDLINE_DATA (NUL-terminated) and _SIZE (NUL included), _ADDR where given.

        QEMU's x86 machines leave FW_CFG_KERNEL_CMDLINE (0x09) out (other architectures put
        the command line's address there), and so does pyvmm.
        """
        text = os.fsencode(cmdline)  # a str's non-UTF-8 bytes are surrogate escapes
        if b"\0" in text:
            raise ConfigurationError("fw_cfg: the command line holds a NUL byte")
        self.add_item(FW_CFG_CMDLINE_SIZE, _u32(len(text) + 1, "command line size"))
        self.add_item(FW_CFG_CMDLINE_DATA, text + b"\0")
        if addr is not None:
            self.add_item(FW_CFG_CMDLINE_ADDR, _u32(addr, "command line address"))

    def set_setup(self, data: bytes, addr: int | None = None) -> None:
        """FW_CFG_SETUP_DATA and _SIZE, and _ADDR where given: a bzImage's real-mode part."""
        self.add_item(FW_CFG_SETUP_SIZE, _u32(len(data), "setup size"))
        self.add_item(FW_CFG_SETUP_DATA, data)
        if addr is not None:
            self.add_item(FW_CFG_SETUP_ADDR, _u32(addr, "setup address"))

    def item(self, key: int) -> bytes:
        """What the guest reads at selector key: b"" for an absent item (reads as zeros)."""
        key &= ~FW_CFG_WRITE_CHANNEL & 0xFFFF
        if key == FW_CFG_FILE_DIR:
            names = self._file_names()
            return encode_file_dir(
                (name, FW_CFG_FILE_FIRST + index, len(self._files[name]))
                for index, name in enumerate(names)
            )
        if not key & FW_CFG_ARCH_LOCAL and key >= FW_CFG_FILE_FIRST:
            names = self._file_names()
            index = key - FW_CFG_FILE_FIRST
            return self._files[names[index]] if index < len(names) else b""
        return self._items.get(key, b"")

    # ---- the guest's side: the same operations as the ports, for handlers and tests ----

    def select(self, key: int) -> None:
        """Select an item and rewind it to offset 0, as a write of key to the selector."""
        self._selected = key & 0xFFFF
        self._data = self.item(self._selected)
        self._offset = 0

    def read(self, length: int) -> bytes:
        """The next length bytes of the selected item, as that many data-port reads."""
        chunk = self._data[self._offset : self._offset + length]
        self._offset += len(chunk)
        return chunk.ljust(length, b"\0")

    def dma(self, address: int) -> int:
        """Run the DMA operation whose FWCfgDmaAccess is at guest-physical address.

        The resulting control word (0, or FW_CFG_DMA_CTL_ERROR) is written back over the
        structure's control field, big-endian, and returned. A structure that is not in RAM
        fails with nothing written, unless its control field is in RAM (as in QEMU).
        """
        memory = self.memory
        if not memory.contains(address, _DMA_ACCESS.size):
            if memory.contains(address, 4):
                memory.write(address, FW_CFG_DMA_CTL_ERROR.to_bytes(4, "big"))
            return FW_CFG_DMA_CTL_ERROR
        control, length, target = _DMA_ACCESS.unpack(memory.read(address, _DMA_ACCESS.size))
        result = self._transfer(control, length, target)
        memory.write(address, result.to_bytes(4, "big"))
        return result

    def _transfer(self, control: int, length: int, target: int) -> int:
        # QEMU's fw_cfg_dma_transfer: READ wins over WRITE over SKIP; none of them is a no-op.
        if control & FW_CFG_DMA_CTL_SELECT:
            self.select(control >> 16)
        if control & FW_CFG_DMA_CTL_READ:
            operation = FW_CFG_DMA_CTL_READ
        elif control & FW_CFG_DMA_CTL_WRITE:
            operation = FW_CFG_DMA_CTL_WRITE
        elif control & FW_CFG_DMA_CTL_SKIP:
            operation = FW_CFG_DMA_CTL_SKIP
        else:
            length = 0
        memory = self.memory
        result = 0
        # At most two rounds: what is left of the item, then what lies past its end.
        while length and not result & FW_CFG_DMA_CTL_ERROR:
            left = len(self._data) - self._offset
            count = min(length, left) if left > 0 else length
            if operation == FW_CFG_DMA_CTL_WRITE:
                # No item is writable: pyvmm keeps the configuration the VMM gave.
                result |= FW_CFG_DMA_CTL_ERROR
            elif operation == FW_CFG_DMA_CTL_READ:
                if not memory.contains(target, count):
                    result |= FW_CFG_DMA_CTL_ERROR
                elif left > 0:
                    chunk = self._data[self._offset : self._offset + count]
                    memory.write(target, chunk)
                else:
                    memory.fill(target, count, 0)  # past the end reads as zeros
            if left > 0:
                self._offset += count  # QEMU advances even when the copy failed
            target += count
            length -= count
        return result

    # ---- the port handlers ----

    def io_access(self, offset: int, data: memoryview, is_write: bool) -> None:
        """Ports 0x510-0x511: word write to 0x510 selects, byte reads stream the item."""
        if is_write:
            if offset == 0 and len(data) == 2:
                with self._lock:
                    self.select(data[0] | data[1] << 8)
            return  # byte writes are data writes, ignored since QEMU v2.4
        if len(data) != 1:
            data[:] = bytes(len(data))  # QEMU accepts only byte reads; others read as 0
            return
        # The hot path: one call per byte of a legacy read. Kept to a few operations.
        with self._lock:
            offset = self._offset
            item = self._data
            if offset < len(item):
                data[0] = item[offset]
                self._offset = offset + 1
            else:
                data[0] = 0

    def dma_access(self, offset: int, data: memoryview, is_write: bool) -> None:
        """Ports 0x514-0x51B: the big-endian DMA address register (reads: "QEMU CFG")."""
        size = len(data)
        if not is_write:
            data[:] = _SIGNATURE_BYTES[offset : offset + size].ljust(size, b"\0")
            return
        value = int.from_bytes(data, "big")
        with self._lock:
            if size == 4 and offset == 0:
                self._dma_address = value << 32
            elif size == 4 and offset == 4:
                address = self._dma_address | value
                self._dma_address = 0  # the register reads 0 after an operation
                self.dma(address)
            elif size == 8 and offset == 0:
                self._dma_address = 0
                self.dma(value)
            # Other widths and offsets are not accepted by QEMU either: ignored.


def add_fw_cfg(machine: Machine, *, max_cpus: int | None = None) -> FwCfg:
    """Give a built Machine the fw_cfg device on ports 0x510-0x511 and 0x514-0x51B.

    Uses machine.pio, machine.memory and machine.cpus. Raises ConfigurationError if those
    ports are claimed already (the exit benchmark's guest uses them).
    """
    return FwCfg(machine.pio, machine.memory, cpus=machine.cpus, max_cpus=max_cpus)
