"""Port I/O and MMIO buses: who answers which address.

A bus is a set of non-overlapping ranges, each served either natively by the C run loop (UART,
debug exit, power-off, forwarding to a file descriptor) or by a Python callable. Ranges are
registered while the machine is built; ``compile()`` then lays them out as the sorted C array
that the run loop searches on every exit. A range added or removed while vCPUs run (a guest
moving a BAR) gives a new table, which every watching vCPU loop is pointed at in one store;
old tables stay alive until the bus goes, since a vCPU may still be searching one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyvmm._native import ffi, lib
from pyvmm.errors import ConfigurationError

#: A Python device handler: called with (offset into the range, zero-copy view of the access's
#: bytes, is_write). For a read it fills the view; for a write it reads it.
PythonHandler = Callable[[int, memoryview, bool], None]


@dataclass(frozen=True)
class NativeHandler:
    """A range served inside the C run loop, without entering Python."""

    kind: int
    fd: int = -1
    fd_offset: int = 0
    device: Any = ffi.NULL
    keep: Any = None  #: keeps the memory behind device alive as long as the range
    #: Called like a PythonHandler for the accesses the C side hands back (MSI-X table writes).
    python: PythonHandler | None = None


@dataclass(frozen=True)
class BusRange:
    """One claimed range and what serves it."""

    base: int
    length: int
    name: str
    handler: NativeHandler | PythonHandler

    @property
    def end(self) -> int:
        """One past the last address of the range."""
        return self.base + self.length


class Bus:
    """A port I/O or MMIO address space: registration with overlap checks, then a C table."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.ranges: list[BusRange] = []
        self._table: Any = None
        self._bus: Any = None
        self._retired: list[Any] = []
        #: Per compiled table (its struct pyvmm_bus * as an int): the Python handlers and the
        #: ranges by index, so an access is served by the table that found it.
        self.tables: dict[int, tuple[list[PythonHandler | None], list[BusRange]]] = {}
        self._counts: dict[tuple[int, str], int] = {}
        #: Callbacks run with the new struct pyvmm_bus * whenever the table is rebuilt.
        self.watchers: list[Callable[[Any], None]] = []

    def add(
        self, base: int, length: int, handler: NativeHandler | PythonHandler, name: str = ""
    ) -> None:
        """Claim [base, base + length) for handler; raises if it overlaps a claimed range."""
        name = name or getattr(handler, "__qualname__", type(handler).__name__)
        if length <= 0 or base < 0 or base + length > self.size:
            raise ConfigurationError(
                f"{self.name} range {name} [{base:#x}, {base + length:#x}) is outside the bus"
            )
        new = BusRange(base, length, name, handler)
        for other in self.ranges:
            if new.base < other.end and other.base < new.end:
                raise ConfigurationError(
                    f"{self.name} range {name} [{new.base:#x}, {new.end:#x}) overlaps "
                    f"{other.name} [{other.base:#x}, {other.end:#x}): move one of them"
                )
        self.ranges.append(new)
        self.ranges.sort(key=lambda r: r.base)
        self._changed()

    def remove(self, base: int) -> None:
        """Release the range that starts at base."""
        claimed = [r for r in self.ranges if r.base == base]
        if not claimed:
            raise ConfigurationError(f"{self.name}: no range starts at {base:#x}")
        self._save_counts()
        self.ranges.remove(claimed[0])
        self._changed()

    def _changed(self) -> None:
        if self._bus is None:
            return
        self._save_counts()
        self._retired.append((self._table, self._bus))
        self._bus = None
        if self.watchers:
            compiled = self.compile()
            for watcher in self.watchers:
                watcher(compiled)

    def _save_counts(self) -> None:
        if self._table is None:
            return
        for entry, claimed in zip(self._table, self._compiled_ranges, strict=False):
            key = (claimed.base, claimed.name)
            self._counts[key] = self._counts.get(key, 0) + entry.hits
            entry.hits = 0

    def hits(self) -> dict[tuple[int, str], int]:
        """Accesses served per (base, name) of every range this bus has held, for --stats."""
        self._save_counts()
        return {key: count for key, count in self._counts.items() if count}

    def add_fd(self, base: int, length: int, fd: int, fd_offset: int = 0, name: str = "") -> None:
        """Forward accesses to fd with pread/pwrite at fd_offset + (address - base), natively."""
        handler = NativeHandler(lib.PYVMM_HANDLER_FD, fd=fd, fd_offset=fd_offset)
        self.add(base, length, handler, name or f"fd {fd}")

    def add_buffer(self, base: int, length: int, name: str = "") -> np.ndarray:
        """Back [base, base + length) with host memory, served natively; returns that memory.

        Guest writes land in the returned array and guest reads come from it: a mailbox
        between a test guest and the test, or registers whose values the test sets.
        """
        buffer = np.zeros(length, dtype=np.uint8)
        handler = NativeHandler(
            lib.PYVMM_HANDLER_BUFFER, device=ffi.from_buffer(buffer), keep=buffer
        )
        self.add(base, length, handler, name or "buffer")
        return buffer

    def find(self, address: int) -> BusRange | None:
        """Return the range claiming address, if any."""
        for candidate in self.ranges:
            if candidate.base <= address < candidate.end:
                return candidate
        return None

    def python_handlers(self) -> list[PythonHandler | None]:
        """Per range index of the compiled table: the Python handler (None: native only)."""
        return [
            r.handler.python if isinstance(r.handler, NativeHandler) else r.handler
            for r in self.ranges
        ]

    def compile(self) -> Any:
        """Return a struct pyvmm_bus * for the run loop (valid while this Bus lives)."""
        if self._bus is None:
            table = ffi.new("struct pyvmm_range[]", max(1, len(self.ranges)))
            for entry, claimed in zip(table, self.ranges, strict=False):
                entry.base = claimed.base
                entry.length = claimed.length
                handler = claimed.handler
                if isinstance(handler, NativeHandler):
                    entry.kind = handler.kind
                    entry.fd = handler.fd
                    entry.fd_offset = handler.fd_offset
                    entry.device = handler.device
                else:
                    entry.kind = lib.PYVMM_HANDLER_PYTHON
            self._table = table
            self._compiled_ranges = list(self.ranges)
            self._bus = ffi.new("struct pyvmm_bus *", {"ranges": table, "count": len(self.ranges)})
            address = int(ffi.cast("uintptr_t", self._bus))
            self.tables[address] = (self.python_handlers(), self._compiled_ranges)
        return self._bus
