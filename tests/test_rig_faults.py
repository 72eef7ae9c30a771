"""Fault injection over device assignment, on a real kernel VFIO stack (the nested rig).

PYVMM_FAULT_INJECT fails one traced ioctl or device-node open as the kernel would. For each
VFIO path, a clean traced run lists every call of set-up and teardown; then each call is failed
in turn, and every time: one `pyvmm: ` line and no traceback, an even status, FILE_ADD and
FILE_DEL balanced in the trace, and the device assignable by the next run. In process (the
Machine API) every position is walked and the fd set must come back unchanged; through the
command line, the first position of every distinct call (every N with PYVMM_RIG_FAULTS_ALL=1,
slow under nested TCG).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from pyvmm import Machine, PyvmmError, guest_path, ioctl
from pyvmm.testing import open_fds
from tests.test_rig_assign import PATHS, rig_env

pytestmark = pytest.mark.rig
#: A guest that ends at once: set-up and teardown are what is walked, not the guest.
GUEST = "hello"
TIMEOUT = 120
_CALL = re.compile(r"trace: (?!close\()(\w+)\((.*)\) = (\S+)")
_FILE_OP = re.compile(r"KVM_SET_DEVICE_ATTR\(.*KVM_DEV_VFIO_FILE_(ADD|DEL).*\) = (\S+)")


def traced_calls(stderr: str) -> list[str]:
    """The name of each traced call, in the order PYVMM_FAULT_INJECT counts them."""
    return [match.group(1) for line in stderr.splitlines() if (match := _CALL.match(line))]


def file_registrations(stderr: str) -> tuple[int, int]:
    """How many FILE_ADDs succeeded, and for how many files pyvmm issued FILE_DEL.

    A FILE_DEL that fails still ends the registration: closing the KVM-VFIO device, the
    next step, drops it.
    """
    found = [m.groups() for line in stderr.splitlines() if (m := _FILE_OP.search(line))]
    return found.count(("ADD", "0")), sum(kind == "DEL" for kind, _ in found)


def run_device(device: str, path: str, fault: str | None = None):
    env = dict(os.environ)
    env.pop("PYVMM_FAULT_INJECT", None)
    if fault is not None:
        env["PYVMM_FAULT_INJECT"] = fault
    command = ["run", GUEST, "--device", device, "--vfio", path, "--trace"]
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *command, "--timeout", str(TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def first_positions(calls: list[str]) -> list[int]:
    """1-based position of the first call of every distinct name."""
    seen: dict[str, int] = {}
    for position, name in enumerate(calls, 1):
        seen.setdefault(name, position)
    return sorted(seen.values())


@pytest.mark.parametrize("path", PATHS)
def test_every_injected_fault_on_the_command_line_ends_cleanly(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    clean = run_device(edu, path)
    assert clean.returncode == 0, clean.stderr
    calls = traced_calls(clean.stderr)
    assert "KVM_SET_DEVICE_ATTR" in calls and len(calls) > 20, clean.stderr
    every = os.environ.get("PYVMM_RIG_FAULTS_ALL")
    positions = range(1, len(calls) + 1) if every else first_positions(calls)
    failures = [
        problem for position in positions if (problem := _fault_problem(edu, path, position, calls))
    ]
    survived = len(positions) - len(failures)
    print(f"{path}: {survived} of {len(positions)} faults survived ({len(calls)} traced calls)")
    assert not failures, f"{len(failures)} of {len(positions)} faults failed:\n" + "\n".join(
        failures
    )


def _fault_problem(device: str, path: str, position: int, calls: list[str]) -> str | None:
    """What went wrong when call position failed (None: it ended cleanly). Every position
    is walked even after one goes wrong, so that a full walk reports them all."""
    done = run_device(device, path, f"{position}:EIO")
    where = f"fault at call {position} ({calls[position - 1]}) on {path}"
    pyvmm_lines = [line for line in done.stderr.splitlines() if line.startswith("pyvmm: ")]
    added, deleted = file_registrations(done.stderr)
    if "[injected]" not in done.stderr:
        return f"{where}: never reached:\n{done.stderr}"
    if "Traceback" in done.stderr:
        return f"{where}: a traceback:\n{done.stderr}"
    # A failure a caller tolerates may still end the run well.
    if done.returncode != 0 and (len(pyvmm_lines) != 1 or done.returncode % 2):
        return f"{where}: status {done.returncode}, {len(pyvmm_lines)} pyvmm lines:\n{done.stderr}"
    if added != deleted:
        return f"{where}: {added} FILE_ADD, {deleted} FILE_DEL:\n{done.stderr}"
    again = run_device(device, path)
    if again.returncode != 0:
        return f"{where}: the next run failed with {again.returncode}:\n{again.stderr}"
    return None


def _run_in_process(device: str, path: str) -> None:
    with Machine(serial="capture") as machine:
        machine.assign(device, vfio=path)
        machine.load(guest_path(GUEST))
        assert machine.run(timeout=TIMEOUT).exit_status == 0


@pytest.mark.parametrize("path", PATHS)
def test_every_injected_fault_in_process_leaks_no_fd(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    trace = io.StringIO()
    ioctl.trace_to(trace)
    try:
        _run_in_process(edu, path)
    finally:
        ioctl.trace_to(None)
    count = len(traced_calls(trace.getvalue()))
    assert count > 20, trace.getvalue()
    failed = 0
    for position in range(1, count + 1):
        before = open_fds()
        trace = io.StringIO()
        ioctl.trace_to(trace)
        ioctl.inject_fault(f"{position}:EIO")
        try:
            _run_in_process(edu, path)
        except PyvmmError as error:
            assert error.message and "\n" not in error.message
            assert int(error.exit_status) % 2 == 0
            failed += 1
        finally:
            plan = ioctl._fault_plan
            ioctl.inject_fault(None)
            ioctl.trace_to(None)
        assert plan is not None and plan.fired, f"call {position} was never reached"
        assert open_fds() == before, f"a fault at call {position} leaked an fd:\n{trace.getvalue()}"
        added, deleted = file_registrations(trace.getvalue())
        assert added == deleted, trace.getvalue()
    _run_in_process(edu, path)  # the device is still assignable
    print(f"{path}: {count} faults injected in process, {failed} failed the run, 0 fds leaked")
