"""One run of a Machine: a thread per vCPU, the wait for the first reason to stop (a guest
exit, a failure, the timeout, SIGINT/SIGTERM), stopping every vCPU, and the RunResult.

Apart from machine.py, which builds the VM: this is what happens once it runs.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any

from pyvmm._native import ffi
from pyvmm.bus import NativeHandler
from pyvmm.errors import DeviceHandlerError, ExitStatus
from pyvmm.ioctl import trace
from pyvmm.result import EXIT_REASON_NAMES, RunResult, Unclaimed, describe_stop, register_dump
from pyvmm.vcpu import VcpuRunner, VcpuStop

#: Seconds a kicked vCPU thread may take to end before pyvmm says which one is stuck.
_STUCK_AFTER = 5.0


class MachineRun:
    """One run of a Machine: vCPU threads, the wait, the stop, and the result."""

    def __init__(self, machine: Any, timeout: float | None, handle_signals: bool) -> None:
        self.machine = machine
        self.stop_flag = ffi.new("int *")
        self.runners = [
            VcpuRunner(vcpu, machine.pio, machine.mmio, self.stop_flag, machine.fail_on_unclaimed)
            for vcpu in machine.vcpus
        ]
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.stops: dict[int, VcpuStop] = {}
        self.first_failure: tuple[VcpuRunner, VcpuStop] | None = None
        self.signalled: int | None = None
        self.timed_out = False
        self.timeout = timeout
        self.handle_signals = handle_signals

    def _vcpu_thread(self, runner: VcpuRunner) -> None:
        try:
            stop = runner.run()
        except BaseException as error:  # a bug in pyvmm itself: report it, don't hang
            runner.exception = error
            stop = VcpuStop.HANDLER_RAISED
        with self.lock:
            self.stops[runner.vcpu.index] = stop
            if stop not in (VcpuStop.HALTED, VcpuStop.INTERRUPTED) and self.first_failure is None:
                self.first_failure = (runner, stop)
            halted = sum(s is VcpuStop.HALTED for s in self.stops.values())
            if self.first_failure or halted == len(self.runners):
                self.done.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signalled = signum
        self.done.set()

    def _stop_all(self) -> None:
        self.stop_flag[0] = 1
        for runner in self.runners:
            runner.kick()

    def result(self) -> RunResult:
        """Start the vCPUs, wait for the run to end, stop them all, and say what happened."""
        previous = {}
        if self.handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._on_signal)
        threads = [
            threading.Thread(target=self._vcpu_thread, args=(r,), name=f"vcpu{r.vcpu.index}")
            for r in self.runners
        ]
        started = time.monotonic()
        # Marks in --trace where set-up ends and teardown begins: what lies between is what
        # the guest made pyvmm do (the fault walks fail exactly those calls).
        trace("run: vCPUs start")
        try:
            for thread in threads:
                thread.start()
            # A vCPU's end or a signal sets done; the signal handlers run during the wait.
            self.timed_out = not self.done.wait(self.timeout)
        finally:
            self._stop_all()
            for runner, thread in zip(self.runners, threads, strict=True):
                self._join(runner, thread)
            trace("run: vCPUs stopped")
            # Machine.close() puts them back once it has released everything: a Ctrl-C
            # during teardown must not abort it.
            self.machine.signal_handlers.update(previous)
        return self._build_result(time.monotonic() - started)

    def _join(self, runner: VcpuRunner, thread: threading.Thread) -> None:
        # A kicked vCPU ends within an exit: immediate_exit stays set, so KVM_RUN returns at
        # once, and no native handler blocks (the UART never writes to a consumer on the vCPU
        # thread). Only a Python device handler that blocks can hold one, and that thread
        # cannot be abandoned: it uses the kvm_run page and guest RAM, and freeing them under
        # it would crash the process. So the wait goes on, but says what it waits for.
        thread.join(_STUCK_AFTER)
        if thread.is_alive():
            print(
                f"pyvmm: warning: vCPU {runner.vcpu.index} has not stopped {_STUCK_AFTER:g} s"
                f" after the stop: its device handler ({runner.access_range_name()}) is blocked",
                file=sys.stderr,
            )
            thread.join()

    def _build_result(self, elapsed: float) -> RunResult:
        machine = self.machine
        if self.first_failure is not None:
            runner, stop = self.first_failure
            if stop is VcpuStop.HANDLER_RAISED and runner.exception is not None:
                self._raise_handler_error(runner)
            outcome, status, message = describe_stop(runner, stop)
            vcpu = runner.vcpu.index
        elif self.signalled is not None:
            name = signal.Signals(self.signalled).name
            outcome, status, message = "signal", ExitStatus.SIGNALLED, f"stopped by {name}"
            vcpu = None
        elif self.timed_out:
            outcome, status, vcpu = "timeout", ExitStatus.TIMEOUT, None
            message = f"guest still running after the {self.timeout:g} s timeout"
        else:
            outcome, status, message, vcpu = (
                "halted",
                0,
                "every vCPU halted with interrupts off",
                None,
            )
        failed = status != 0 and outcome != "exit"
        dump_from = [machine.vcpus[vcpu]] if vcpu is not None else machine.vcpus
        result = RunResult(
            outcome=outcome,
            exit_status=int(status),
            message=message,
            vcpu=vcpu,
            registers="\n".join(register_dump(v) for v in dump_from) if failed else "",
            elapsed=elapsed,
        )
        reasons: dict[str, int] = {}
        for runner in self.runners:
            loop = runner.loop
            result.exits += loop.exits
            result.python_exits += loop.python_exits
            for number, count in enumerate(loop.exit_reasons):
                if count:
                    name = EXIT_REASON_NAMES.get(number, str(number))
                    reasons[name] = reasons.get(name, 0) + count
            runner.detach()
        result.exit_reasons = dict(sorted(reasons.items(), key=lambda item: -item[1]))
        for space, bus in (("port", machine.pio), ("MMIO", machine.mmio)):
            native = {r.base: isinstance(r.handler, NativeHandler) for r in bus.ranges}
            for (base, name), count in sorted(bus.hits().items()):
                result.range_hits.append((space, name, base, count, native.get(base, True)))
        for runner in self.runners:
            loop = runner.loop
            _add_unclaimed(result.unclaimed_pio, loop.unclaimed_pio)
            _add_unclaimed(result.unclaimed_mmio, loop.unclaimed_mmio)
        # Bounded (serial.FLUSH_TIMEOUT): a consumer that stopped reading loses the rest.
        result.serial_dropped = machine.serial.flush()
        with contextlib.suppress(ValueError):
            result.serial = machine.serial.captured()
        return result

    @staticmethod
    def _raise_handler_error(runner: VcpuRunner) -> None:
        # A device bug is the device's failure (status 22), not pyvmm's: the original
        # exception stays reachable as __cause__ for a Python caller.
        error = runner.exception
        runner.exception = None
        raise DeviceHandlerError(
            f"the Python handler of {runner.access_range_name()} on vCPU {runner.vcpu.index} "
            f"raised {type(error).__name__}: {_one_line(error)}: fix the device handler"
        ) from error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or "(no message)"


def _add_unclaimed(total: Unclaimed, record: Any) -> None:
    if record.count:
        total.count += record.count
        total.last_address = record.last_address
        total.last_size = record.last_size
        total.last_is_write = bool(record.last_is_write)
