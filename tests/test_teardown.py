"""Stopping a run (timeout, SIGTERM) tears everything down: every fd the run opened closes."""

from __future__ import annotations

import os
import re
import signal
import threading

import pytest

from pyvmm import ExitStatus, Machine, PyvmmError, guest_path
from pyvmm.testing import open_fds

pytestmark = pytest.mark.usefixtures("kvm_required")


def run_spin(timeout: float, cpus: int = 2):
    with Machine(serial="capture", cpus=cpus) as machine:
        machine.load(guest_path("spin"))
        return machine.run(timeout=timeout)


def test_timeout_stops_every_vcpu_and_leaks_nothing():
    before = open_fds()
    result = run_spin(timeout=0.5)
    assert result.outcome == "timeout"
    assert result.exit_status == ExitStatus.TIMEOUT
    assert result.serial_text == "spinning\n"
    assert open_fds() == before


def test_sigterm_stops_every_vcpu_and_leaks_nothing():
    before = open_fds()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        result = run_spin(timeout=30)
    finally:
        timer.cancel()
    assert result.outcome == "signal"
    assert result.exit_status == ExitStatus.SIGNALLED
    assert result.message == "stopped by SIGTERM"
    assert open_fds() == before
    # The run put the previous SIGTERM disposition back.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_guest_end_leaks_nothing(run_guest):
    before = open_fds()
    for guest, cpus in (("hello", 1), ("smp", 3), ("triple_fault", 1)):
        run_guest(guest, cpus=cpus)
    assert open_fds() == before


def test_failed_load_leaks_nothing(tmp_path):
    before = open_fds()
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\0" * 10)
    with pytest.raises(PyvmmError), Machine(serial="capture") as machine:
        machine.load(bad)
    assert open_fds() == before


def test_failed_build_leaks_nothing(tmp_path):
    before = open_fds()
    with pytest.raises(PyvmmError):
        Machine(memory="lots")
    with pytest.raises(PyvmmError):
        Machine(serial=f"file:{tmp_path}/missing/dir/out")
    assert open_fds() == before


def test_a_machine_runs_once():
    with Machine(serial="capture") as machine:
        machine.load(guest_path("hello"))
        assert machine.run(timeout=30).exit_status == 0
        with pytest.raises(PyvmmError, match="runs once"):
            machine.run(timeout=30)


def _count_traced_calls(stream_text: str) -> int:
    calls = re.compile(r"trace: (?!close\()\w+\(")
    return sum(1 for line in stream_text.splitlines() if calls.match(line))


def test_every_injected_fault_fails_cleanly_and_leaks_nothing():
    """Each traced ioctl and open of a hello run, failed in turn: a PyvmmError, no fd left."""
    import io

    from pyvmm import ioctl

    trace = io.StringIO()
    ioctl.trace_to(trace)
    try:
        with Machine(serial="capture") as machine:
            machine.load(guest_path("hello"))
            assert machine.run(timeout=30).exit_status == 0
    finally:
        ioctl.trace_to(None)
    count = _count_traced_calls(trace.getvalue())
    assert count >= 10
    failed = 0
    for position in range(1, count + 1):
        before = open_fds()
        ioctl.inject_fault(f"{position}:EIO")
        try:
            with Machine(serial="capture") as machine:
                machine.load(guest_path("hello"))
                machine.run(timeout=30)
        except PyvmmError as error:
            assert error.message and "\n" not in error.message
            assert int(error.exit_status) % 2 == 0
            failed += 1
        finally:
            fired = ioctl._fault_plan is not None and ioctl._fault_plan.fired
            ioctl.inject_fault(None)
        assert fired, f"traced call {position} was never reached"
        assert open_fds() == before, f"fault at traced call {position} leaked an fd"
    assert failed >= count - 2  # a caller may tolerate a failure it branches on


def test_a_raising_step_and_a_signal_do_not_cut_teardown_short():
    closed: list[str] = []

    def interrupt() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of teardown
        closed.append("interrupted")

    def fail() -> None:
        closed.append("failed")
        raise PyvmmError("a closer failed")

    before = open_fds()
    machine = Machine(serial="capture")
    machine.load(guest_path("hello"))
    assert machine.run(timeout=30).exit_status == 0
    # Steps run newest first: fail, then interrupt, then every real closer.
    machine._closers += [interrupt, fail]
    with pytest.raises(PyvmmError, match="a closer failed"):
        machine.close()
    assert closed == ["failed", "interrupted"]
    assert open_fds() == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
