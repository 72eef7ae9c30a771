"""One vCPU's run loop as seen from Python: call the C loop, serve the exits it hands back.

The C loop (csrc/runloop.c) returns only when Python must act: an access to a range served
by a Python handler, or the end of this vCPU's run. Handlers get zero-copy memoryviews into
the vCPU's kvm_run page, so a read is answered by writing into the view.
"""

from __future__ import annotations

import enum
import signal
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
    HANDLER_RAISED = 100  #: a Python handler raised; the exception is kept


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
        loop.pio = pio.compile()
        loop.mmio = mmio.compile()
        loop.stop = stop_flag
        loop.fail_on_unclaimed = int(fail_on_unclaimed)
        self._handlers = (pio.python_handlers(), mmio.python_handlers())
        self._buses = (pio, mmio)
        # The whole kvm_run page as one memoryview: handler views are slices of it.
        self._page = memoryview(ffi.buffer(vcpu.run, vcpu.mmap_size))
        self.exception: BaseException | None = None
        self.thread_id: int | None = None

    def run(self) -> VcpuStop:
        """Run until the vCPU stops; returns why (details stay in self.loop)."""
        loop = self.loop
        run_loop = lib.pyvmm_vcpu_run
        python_stop = lib.PYVMM_STOP_PYTHON
        while True:
            stop = run_loop(loop)
            if stop != python_stop:
                return VcpuStop(stop)
            try:
                self._serve(loop)
            except BaseException as error:  # a device bug: stop the VM and hand it back
                self.exception = error
                return VcpuStop.HANDLER_RAISED

    def _serve(self, loop: Any) -> None:
        handler = self._handlers[loop.access_is_mmio][loop.access_range]
        size = loop.access_size
        start = loop.access_data_offset
        offset = loop.access_offset
        is_write = bool(loop.access_is_write)
        page = self._page
        count = loop.access_count
        if count == 1:
            handler(offset, page[start : start + size], is_write)
            return
        for item in range(count):
            at = start + item * size
            handler(offset, page[at : at + size], is_write)

    def access_range_name(self) -> str:
        """Name of the range of the last Python-handled access."""
        bus = self._buses[self.loop.access_is_mmio]
        return bus.ranges[self.loop.access_range].name

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN now (the stop flag must already be set)."""
        self.vcpu.run.immediate_exit = 1
        if self.thread_id is not None:
            try:
                signal.pthread_kill(self.thread_id, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # the thread already ended
