"""Port I/O and MMIO buses: who answers which address.

A bus is a set of non-overlapping ranges, each served either natively by the C run loop (UART,
debug exit, power-off, forwarding to a file descriptor) or by a Python callable. Ranges are
registered while the machine is built; ``compile()`` then lays them out as the sorted C array
that the run loop searches on every exit. A range added or removed while vCPUs run (a guest
moving a BAR) gives a new table, which every attached vCPU loop is pointed at in one store;
an old table stays alive while a vCPU may still be searching it (see Bus).
"""

from __future__ import annotations

import threading
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
class FirstFault:
    """The first failed access of a tolerant forwarded range."""

    fd_offset: int  #: where on the fd it went
    errno: int
    size: int  #: bytes
    is_write: bool


class ForwardFaults:
    """Failed accesses of tolerant forwarded ranges (struct pyvmm_forward_faults).

    On a tolerant range a failing pread gives the guest all ones and a failing pwrite is
    dropped, as QEMU's vfio_region_read/write do; this record counts them (all vCPUs) and
    keeps the first. One record may serve several ranges (the trapped pieces of one BAR).
    """

    def __init__(self) -> None:
        self.record = ffi.new("struct pyvmm_forward_faults *")

    @property
    def count(self) -> int:
        """Failed accesses so far."""
        return int(self.record.count)

    @property
    def first(self) -> FirstFault | None:
        """The first failed access, once its loop has written it whole."""
        if not self.record.first_ready:
            return None
        record = self.record
        return FirstFault(
            record.first_offset, record.first_errno, record.first_size, bool(record.first_is_write)
        )


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
    #: For fd forwarding: None ends the run on a failing access; else the range is tolerant.
    faults: ForwardFaults | None = None


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


@dataclass
class _Table:
    """One compiled table: the C structs and the ranges (with their Python handlers) by index."""

    bus: Any  #: struct pyvmm_bus *
    entries: Any  #: struct pyvmm_range[], owned here
    ranges: list[BusRange]
    python: list[PythonHandler | None]

    @property
    def address(self) -> int:
        """The struct pyvmm_bus * as an int: how the C loop names this table (access_bus)."""
        return int(ffi.cast("uintptr_t", self.bus))

    def hits(self) -> dict[tuple[int, str], int]:
        """Accesses this table has served, per (base, name) of its ranges."""
        return {
            (claimed.base, claimed.name): self.entries[index].hits
            for index, claimed in enumerate(self.ranges)
        }


class Bus:
    """A port I/O or MMIO address space: registration with overlap checks, then a C table.

    Changes may come from any thread while vCPUs run: every change and every compile happens
    under one lock, so the attached loops always end on the newest table. A replaced table is
    retired and freed once no loop pins it (struct pyvmm_vcpu_loop's *_in_use hazard
    pointers): each loop pins at most one table per bus, so a bus never holds more than one
    retired table per attached loop.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.ranges: list[BusRange] = []
        self._lock = threading.RLock()
        self._current: _Table | None = None
        self._retired: list[_Table] = []
        #: Per live table (its struct pyvmm_bus * as an int): the Python handlers and the
        #: ranges by index, so an access is served by the table that found it. An entry
        #: stays while a loop pins its table, so a Python-handled access always resolves.
        self.tables: dict[int, tuple[list[PythonHandler | None], list[BusRange]]] = {}
        #: Hits of the tables already freed, per (base, name).
        self._counts: dict[tuple[int, str], int] = {}
        #: The loops following this bus: (struct pyvmm_vcpu_loop *, is_mmio).
        self._loops: list[tuple[Any, bool]] = []

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
        with self._lock:
            for other in self.ranges:
                if new.base < other.end and other.base < new.end:
                    raise ConfigurationError(
                        f"{self.name} range {name} [{new.base:#x}, {new.end:#x}) overlaps "
                        f"{other.name} [{other.base:#x}, {other.end:#x}): move one of them"
                    )
            self.ranges = sorted([*self.ranges, new], key=lambda r: r.base)
            self._changed()

    def remove(self, base: int) -> None:
        """Release the range that starts at base."""
        with self._lock:
            claimed = [r for r in self.ranges if r.base == base]
            if not claimed:
                raise ConfigurationError(f"{self.name}: no range starts at {base:#x}")
            self.ranges = [r for r in self.ranges if r is not claimed[0]]
            self._changed()

    def attach(self, loop: Any, is_mmio: bool) -> None:
        """Point loop's pio or mmio table at this bus, and keep it on the newest table."""
        with self._lock:
            lib.pyvmm_loop_publish(loop, int(is_mmio), self.compile())
            self._loops.append((loop, is_mmio))

    def detach(self, loop: Any) -> None:
        """Stop following changes for loop (its run is over: it reads no table any more)."""
        with self._lock:
            self._loops = [entry for entry in self._loops if entry[0] != loop]
            self._reclaim()

    def _changed(self) -> None:
        if self._current is None:
            return
        self._retired.append(self._current)
        self._current = None
        if self._loops:
            compiled = self.compile()
            for loop, is_mmio in self._loops:
                lib.pyvmm_loop_publish(loop, int(is_mmio), compiled)
        self._reclaim()

    def _reclaim(self) -> None:
        """Free the retired tables no loop pins (read after the publish's full barrier)."""
        pinned = {
            int(ffi.cast("uintptr_t", loop.mmio_in_use if is_mmio else loop.pio_in_use))
            for loop, is_mmio in self._loops
        }
        kept = []
        for table in self._retired:
            if table.address in pinned:
                kept.append(table)
                continue
            for key, count in table.hits().items():
                self._counts[key] = self._counts.get(key, 0) + count
            del self.tables[table.address]
        self._retired = kept

    def retired_tables(self) -> int:
        """How many replaced tables are still alive (pinned by a loop)."""
        with self._lock:
            return len(self._retired)

    def hits(self) -> dict[tuple[int, str], int]:
        """Accesses served per (base, name) of every range this bus has held, for --stats."""
        with self._lock:
            counts = dict(self._counts)
            live = [*self._retired, *([self._current] if self._current else [])]
            for table in live:
                for key, count in table.hits().items():
                    counts[key] = counts.get(key, 0) + count
        return {key: count for key, count in counts.items() if count}

    def add_fd(
        self,
        base: int,
        length: int,
        fd: int,
        fd_offset: int = 0,
        name: str = "",
        faults: ForwardFaults | None = None,
    ) -> None:
        """Forward accesses to fd with pread/pwrite at fd_offset + (address - base), natively.

        A failing access ends the run (status DEVICE_ERROR), unless faults is given: then the
        guest reads all ones or its write is dropped, and faults records it.
        """
        handler = NativeHandler(lib.PYVMM_HANDLER_FD, fd=fd, fd_offset=fd_offset, faults=faults)
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
        return _python_handlers(self.ranges)

    def compile(self) -> Any:
        """Return the current struct pyvmm_bus * (valid while this Bus lives and no loop
        attached to it has moved past it)."""
        with self._lock:
            if self._current is None:
                ranges = list(self.ranges)  # one snapshot: the table and its index lists agree
                entries = ffi.new("struct pyvmm_range[]", max(1, len(ranges)))
                for entry, claimed in zip(entries[0 : len(ranges)], ranges, strict=True):
                    entry.base = claimed.base
                    entry.length = claimed.length
                    handler = claimed.handler
                    if isinstance(handler, NativeHandler):
                        entry.kind = handler.kind
                        entry.fd = handler.fd
                        entry.fd_offset = handler.fd_offset
                        entry.device = handler.device
                        entry.faults = handler.faults.record if handler.faults else ffi.NULL
                    else:
                        entry.kind = lib.PYVMM_HANDLER_PYTHON
                python = _python_handlers(ranges)
                bus = ffi.new("struct pyvmm_bus *", {"ranges": entries, "count": len(ranges)})
                table = _Table(bus, entries, ranges, python)
                self.tables[table.address] = (python, ranges)
                self._current = table
            return self._current.bus


def _python_handlers(ranges: list[BusRange]) -> list[PythonHandler | None]:
    return [r.handler.python if isinstance(r.handler, NativeHandler) else r.handler for r in ranges]
