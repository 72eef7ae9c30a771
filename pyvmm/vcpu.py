"""One vCPU's run loop as seen from Python: call the C loop, serve the exits it hands back.

The C loop (csrc/runloop.c) returns only when Python must act: an access to a range served
by a Python handler, or the end of this vCPU's run. Handlers get zero-copy memoryviews into
the vCPU's kvm_run page, so a read is answered by writing into the view.
"""

from __future__ import annotations

import enum
import signal
import struct
import threading
from typing import Any

from pyvmm._native import ffi, lib
from pyvmm.bus import Bus
from pyvmm.kvm import Vcpu


class VcpuStop(enum.IntEnum):
    """Why a vCPU's loop returned (csrc/pyvmm.h, enum pyvmm_stop)."""

    GUEST_EXIT = lib.PYVMM_STOP_GUEST_EXIT
    HALTED = lib.PYVMM_STOP_HALTED
    HALTED_IF = lib.PYVMM_STOP_HALTED_IF
    SHUTDOWN = lib.PYVMM_STOP_SHUTDOWN
    FAIL_ENTRY = lib.PYVMM_STOP_FAIL_ENTRY
    INTERNAL_ERROR = lib.PYVMM_STOP_INTERNAL_ERROR
    SYSTEM_EVENT = lib.PYVMM_STOP_SYSTEM_EVENT
    UNCLAIMED = lib.PYVMM_STOP_UNCLAIMED
    UNHANDLED_EXIT = lib.PYVMM_STOP_UNHANDLED_EXIT
    INTERRUPTED = lib.PYVMM_STOP_INTERRUPTED
    ERROR = lib.PYVMM_STOP_ERROR
    REBOOT = lib.PYVMM_STOP_REBOOT
    HANDLER_RAISED = 100  #: a Python handler raised; the exception is kept


#: The access fields of struct pyvmm_vcpu_loop, access_range to access_offset, read in one go:
#: six u32 then a u64 (one unpack is cheaper than seven cffi field reads on every exit).
_ACCESS = struct.Struct("=6IQQ")
_ACCESS_OFFSET = ffi.offsetof("struct pyvmm_vcpu_loop", "access_range")
assert _ACCESS_OFFSET + _ACCESS.size == ffi.offsetof(
    "struct pyvmm_vcpu_loop", "access_bus"
) + ffi.sizeof("uint64_t"), "struct pyvmm_vcpu_loop's access fields moved"

#: The signal that kicks a vCPU thread out of KVM_RUN. A real-time signal, so it cannot clash
#: with signals an application uses for other things.
KICK_SIGNAL = signal.SIGRTMIN + 1


class VcpuRunner:
    """Runs one vCPU until it stops, serving Python-handled exits in between."""

    def __init__(
        self, vcpu: Vcpu, pio: Bus, mmio: Bus, stop_flag: Any, fail_on_unclaimed: bool
    ) -> None:
        self.vcpu = vcpu
        self.loop = ffi.new("struct pyvmm_vcpu_loop *")
        loop = self.loop
        loop.vcpu_fd = vcpu.fd
        loop.run = vcpu.run
        loop.stop = stop_flag
        loop.fail_on_unclaimed = int(fail_on_unclaimed)
        # A table's entry stays in these while this loop pins it (bus.py), so the table an
        # access was found in still resolves when Python serves it, however the bus changed.
        self._tables = (pio.tables, mmio.tables)
        self._buses = (pio, mmio)
        pio.attach(loop, is_mmio=False)
        mmio.attach(loop, is_mmio=True)
        #: The ranges of the table of the last Python-handled access, and its index there.
        self._last_access: tuple[list[Any], int] | None = None
        self._loop_bytes = ffi.buffer(loop)
        # The whole kvm_run page as one memoryview: handler views are slices of it. The data
        # of an exit sits at a handful of fixed places, so the slices are made once.
        self._page = memoryview(ffi.buffer(vcpu.run, vcpu.mmap_size))
        self._views: dict[tuple[int, int], memoryview] = {}
        self.exception: BaseException | None = None
        # The thread in the C loop, while it may be signalled (see kick()).
        self._thread_id: int | None = None
        self._thread_lock = threading.Lock()

    def run(self) -> VcpuStop:
        """Run in the calling thread until the vCPU stops; returns why (details in self.loop)."""
        with self._thread_lock:
            self._thread_id = threading.get_ident()
        try:
            return self._run()
        finally:
            with self._thread_lock:
                self._thread_id = None

    def _run(self) -> VcpuStop:
        loop = self.loop
        run_loop = lib.pyvmm_vcpu_run
        python_stop = lib.PYVMM_STOP_PYTHON
        while True:
            stop = run_loop(loop)
            if stop != python_stop:
                return VcpuStop(stop)
            try:
                self._serve()
            except BaseException as error:  # a device bug: stop the VM and hand it back
                self.exception = error
                return VcpuStop.HANDLER_RAISED

    def _serve(self) -> None:
        index, is_mmio, is_write, size, count, start, offset, bus = _ACCESS.unpack_from(
            self._loop_bytes, _ACCESS_OFFSET
        )
        handlers, ranges = self._tables[is_mmio][bus]
        self._last_access = (ranges, index)
        handler = handlers[index]
        for item in range(count):
            at = start + item * size
            view = self._views.get((at, size))
            if view is None:
                view = self._views[at, size] = self._page[at : at + size]
            handler(offset, view, is_write == 1)

    def detach(self) -> None:
        """Stop following bus changes (the run is over): its tables may be freed."""
        self._buses[0].detach(self.loop)
        self._buses[1].detach(self.loop)

    def access_range_name(self) -> str:
        """Name of the range of the last Python-handled access (kept past detach())."""
        if self._last_access is None:
            return "?"
        ranges, index = self._last_access
        return ranges[index].name

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN now (the stop flag must already be set)."""
        self.vcpu.run.immediate_exit = 1
        # Under the lock the thread cannot leave run(), so it is alive when signalled:
        # signalling a thread that has exited is undefined.
        with self._thread_lock:
            if self._thread_id is not None:
                signal.pthread_kill(self._thread_id, KICK_SIGNAL)
