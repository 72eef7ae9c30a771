"""The MSI and MSI-X capabilities as the guest sees them: emulated registers, pure logic.

The guest's writes land here, not in the device: the message address and data a guest
programs are only meaningful to the VMM, which turns them into KVM routes. The assigned
device reads the decoded state (enabled, vectors, address, data, masks) after each write.
"""

from __future__ import annotations

import numpy as np

MSI_CONTROL_ENABLE = 0x1
MSI_CONTROL_MULTIPLE_CAPABLE = 0x0E
MSI_CONTROL_MULTIPLE_ENABLE = 0x70
#: 32 vectors, as a log2: Multiple Message Capable/Enable values 6 and 7 are reserved.
MSI_MAX_LOG_VECTORS = 5
MSI_CONTROL_64BIT = 0x80
MSI_CONTROL_PER_VECTOR_MASK = 0x100
MSIX_CONTROL_ENABLE = 0x8000
MSIX_CONTROL_FUNCTION_MASK = 0x4000
MSIX_CONTROL_TABLE_SIZE = 0x7FF
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 0x1


class EmulatedRegisters:
    """A byte range of config space kept by the VMM: initial bytes and a writable-bit mask."""

    def __init__(self, initial: bytes, writable: bytes) -> None:
        self.bytes = bytearray(initial)
        self.writable = bytes(writable)

    def read(self, offset: int, size: int) -> int:
        """Little-endian value of size bytes at offset."""
        return int.from_bytes(self.bytes[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Write, keeping read-only bits."""
        for i in range(size):
            mask = self.writable[offset + i]
            old = self.bytes[offset + i]
            self.bytes[offset + i] = (old & ~mask) | ((value >> 8 * i) & mask)


class MsiCapability(EmulatedRegisters):
    """The MSI capability: enable, multiple-message enable, address, data, per-vector masks."""

    def __init__(self, initial: bytes) -> None:
        control = int.from_bytes(initial[2:4], "little")
        self.is_64 = bool(control & MSI_CONTROL_64BIT)
        self.maskable = bool(control & MSI_CONTROL_PER_VECTOR_MASK)
        self.data_offset = 0xC if self.is_64 else 0x8
        self.mask_offset = self.data_offset + 4
        size = self.mask_offset + (8 if self.maskable else 0)
        writable = bytearray(size)
        writable[2] = MSI_CONTROL_ENABLE | MSI_CONTROL_MULTIPLE_ENABLE
        writable[4:8] = b"\xfc\xff\xff\xff"  # dword-aligned address
        if self.is_64:
            writable[8:12] = b"\xff\xff\xff\xff"
        writable[self.data_offset : self.data_offset + 2] = b"\xff\xff"
        capable = min((control & MSI_CONTROL_MULTIPLE_CAPABLE) >> 1, MSI_MAX_LOG_VECTORS)
        #: log2 of the vectors the device can send: Multiple Message Enable never exceeds it.
        self.log_capable = capable
        if self.maskable:
            # Mask bits past the vectors the device has are reserved (QEMU's msi_init too).
            mask_bits = (1 << (1 << capable)) - 1
            writable[self.mask_offset : self.mask_offset + 4] = mask_bits.to_bytes(4, "little")
        # The guest starts from reset values: disabled, no message, every vector unmasked.
        initial = bytes(initial[:4]) + bytes(size - 4)
        super().__init__(initial, writable)
        self.bytes[2] &= ~(MSI_CONTROL_ENABLE | MSI_CONTROL_MULTIPLE_ENABLE) & 0xFF
        self.size = size

    def write(self, offset: int, size: int, value: int) -> None:
        """Write, keeping read-only bits; Multiple Message Enable is clamped to Capable.

        A guest may ask for more vectors than the device has (or a reserved count): real
        functions and QEMU's msi_write_config then enable as many as it has.
        """
        super().write(offset, size, value)
        enabled = (self.bytes[2] & MSI_CONTROL_MULTIPLE_ENABLE) >> 4
        if enabled > self.log_capable:
            self.bytes[2] = (self.bytes[2] & ~MSI_CONTROL_MULTIPLE_ENABLE & 0xFF) | (
                self.log_capable << 4
            )

    @property
    def enabled(self) -> bool:
        """Whether the guest turned MSI on."""
        return bool(self.read(2, 2) & MSI_CONTROL_ENABLE)

    @property
    def vectors(self) -> int:
        """How many vectors the guest enabled (multiple-message enable)."""
        return 1 << ((self.read(2, 2) & MSI_CONTROL_MULTIPLE_ENABLE) >> 4)

    @property
    def address(self) -> int:
        """The message address."""
        high = self.read(8, 4) if self.is_64 else 0
        return (high << 32) | self.read(4, 4)

    def data(self, vector: int) -> int:
        """The message data of a vector: the low bits carry the vector number."""
        base = self.read(self.data_offset, 2)
        return (base & ~(self.vectors - 1)) | vector

    def masked(self, vector: int) -> bool:
        """Whether the per-vector mask bit of vector is set."""
        return self.maskable and bool(self.read(self.mask_offset, 4) >> vector & 1)


class MsixCapability(EmulatedRegisters):
    """The MSI-X capability's control word, and the vector table the guest programs."""

    def __init__(self, initial: bytes) -> None:
        writable = bytearray(12)
        writable[3] = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) >> 8
        super().__init__(initial[:12], writable)
        self.bytes[3] &= ~writable[3] & 0xFF
        self.size = 12
        self.entries = (self.read(2, 2) & MSIX_CONTROL_TABLE_SIZE) + 1
        table = self.read(4, 4)
        pba = self.read(8, 4)
        self.table_bar, self.table_offset = table & 7, table & ~7
        self.pba_bar, self.pba_offset = pba & 7, pba & ~7
        # Reset state of the table: every vector masked (PCI spec).
        self.table = np.zeros(self.entries * MSIX_ENTRY_SIZE, dtype=np.uint8)
        self.table.reshape(self.entries, 4, 4)[:, 3, 0] = MSIX_VECTOR_MASKED
        self._words = self.table.view(np.uint32).reshape(self.entries, 4)

    @property
    def table_size(self) -> int:
        """Bytes of the table."""
        return self.entries * MSIX_ENTRY_SIZE

    @property
    def enabled(self) -> bool:
        """Whether the guest turned MSI-X on."""
        return bool(self.read(2, 2) & MSIX_CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        """Whether the guest masked every vector at once."""
        return bool(self.read(2, 2) & MSIX_CONTROL_FUNCTION_MASK)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked) of a table entry."""
        low, high, data, control = (int(word) for word in self._words[vector])
        return (high << 32) | low, data, bool(control & MSIX_VECTOR_MASKED)
