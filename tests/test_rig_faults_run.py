"""Fault injection while the guest drives its assigned device, on a real VFIO stack (the rig).

tests/test_rig_faults.py fails the calls of set-up and teardown around a guest that never
touches the device. Here the `edu` guest (guests/edu.c) drives edu as a driver would: memory
decoding on (pyvmm maps BAR0 as a KVM memory slot), registers, DMA, three INTx, then MSI
(pyvmm turns INTx off and wires an MSI route, an irqfd and VFIO's trigger), and the teardown
then undoes MSI, which a hello run never reaches. A clean traced run shows those calls between
the `run: vCPUs start` and `run: vCPUs stopped` marks; each is failed in turn.

What each fault must do, from pyvmm/devices/vfio_pci.py's contract (nothing the guest does
ends the run; what the host refuses is a warning and a device that does not answer there):

- BAR0's memory slot refused: the guest's first register read finds nothing, edu.c's BAD_ID.
- Any call of the MSI set-up refused: no MSI arrives, edu.c's MSI_TIMEOUT, after DMA and INTx
  passed.
- A teardown call refused: the guest had passed; the run ends 0, or with one `pyvmm: ` line
  and an even status.

Every time: a warning for a refused run-time call, no traceback, FILE_ADD and FILE_DEL
balanced in the trace, the fd set unchanged (in process), and the device still working: the
next run gets as far as its own expectation says, and a clean run at the end passes. In
process every position is walked; through the command line the first position of each
distinct call of the run (every position of run and teardown with PYVMM_RIG_FAULTS_ALL=1).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from pyvmm import Machine, PyvmmError, guest_path, ioctl
from pyvmm.testing import open_fds
from tests.test_rig_assign import PATHS, rig_env
from tests.test_rig_faults import file_registrations

pytestmark = pytest.mark.rig
GUEST = "edu"
#: Seconds a run may take: the guest waits 5 s for an interrupt that does not come.
TIMEOUT = 240
#: edu.c's failure codes, as exit statuses: guest_exit(code) ends the run with (code << 1) | 1.
BAD_ID = (4 << 1) | 1
MSI_TIMEOUT = (15 << 1) | 1
#: Lines of edu.c's output that show how far the guest got.
PASSED, DMA_DONE = "edu: all ok", "dma ok: "
_LINE = re.compile(r"trace: (?:run: vCPUs (start|stopped)|(?!close\()(\w+)\((.*)\) = (\S+))")


@dataclass(frozen=True)
class Call:
    """One traced call, numbered as PYVMM_FAULT_INJECT counts them."""

    position: int
    name: str
    arguments: str
    phase: str  #: "set-up", "run" or "teardown"


def calls_by_phase(stderr: str) -> list[Call]:
    """Every traced ioctl and device open, with the phase it happened in."""
    calls, phase = [], "set-up"
    for line in stderr.splitlines():
        if not (match := _LINE.match(line)):
            continue
        mark, name, arguments, _ = match.groups()
        if mark:
            phase = "run" if mark == "start" else "teardown"
        else:
            calls.append(Call(len(calls) + 1, name, arguments, phase))
    return calls


def expected_status(call: Call, run_calls: list[Call]) -> int | None:
    """The exit status a fault in call must end the run with; None: 0 or an even status."""
    if call.phase == "teardown":
        return None
    if call == run_calls[0]:
        # The first thing the guest makes pyvmm do: map BAR0 when it turns decoding on.
        assert call.name == "KVM_SET_USER_MEMORY_REGION" and "size=0x0," not in call.arguments
        return BAD_ID
    return MSI_TIMEOUT


def walked(calls: list[Call]) -> list[Call]:
    """The calls the guest's run causes: during the run, and the teardown after it."""
    return [call for call in calls if call.phase != "set-up"]


def check_outcome(
    call: Call, run_calls: list[Call], status: int, output: str, warnings: list[str]
) -> None:
    """The run that failed call ended as the module docstring says."""
    where = f"fault at call {call.position} ({call.name}({call.arguments}), {call.phase})"
    expected = expected_status(call, run_calls)
    if expected is None:
        assert PASSED in output, f"{where}: the guest did not pass:\n{output}"
        assert status % 2 == 0, f"{where}: status {status}"
        return
    assert status == expected, f"{where}: status {status}, not {expected}:\n{output}"
    assert warnings, f"{where}: no warning for the refused call"
    if expected == MSI_TIMEOUT:  # the device still did everything before MSI
        assert DMA_DONE in output and "intx 3 ok" in output, f"{where}:\n{output}"


# ---- in process: every position, the fd set ---------------------------------------------
def run_in_process(device: str, path: str, trace: io.StringIO, fault: str | None = None):
    """Run the guest with device assigned; (exit status, serial output, device warnings)."""
    ioctl.trace_to(trace)
    ioctl.inject_fault(fault)
    try:
        with Machine(serial="capture") as machine:
            assigned = machine.assign(device, vfio=path)
            machine.load(guest_path(GUEST))
            result = machine.run(timeout=TIMEOUT)
        return result.exit_status, result.serial.decode(errors="replace"), assigned.warning_lines()
    finally:
        plan = ioctl._fault_plan
        ioctl.inject_fault(None)
        ioctl.trace_to(None)
        assert fault is None or (plan is not None and plan.fired), f"{fault} was never reached"


@pytest.mark.parametrize("path", PATHS)
def test_every_run_time_fault_in_process(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    trace = io.StringIO()
    status, output, _ = run_in_process(edu, path, trace)
    assert status == 0 and PASSED in output, output + trace.getvalue()
    calls = calls_by_phase(trace.getvalue())
    run_calls = [call for call in calls if call.phase == "run"]
    names = {call.name for call in run_calls}
    assert {
        "KVM_SET_USER_MEMORY_REGION",
        "VFIO_DEVICE_SET_IRQS",
        "KVM_IRQFD",
        "KVM_SET_GSI_ROUTING",
    } <= names, trace.getvalue()
    errors = 0
    for call in walked(calls):
        before = open_fds()
        trace = io.StringIO()
        try:
            status, output, warnings = run_in_process(edu, path, trace, f"{call.position}:EIO")
        except PyvmmError as error:  # only teardown may fail the run itself
            assert call.phase == "teardown", f"call {call.position}: {error.message}"
            assert error.message and "\n" not in error.message
            assert int(error.exit_status) % 2 == 0
            errors += 1
        else:
            check_outcome(call, run_calls, status, output, warnings)
        assert open_fds() == before, f"a fault at call {call.position} leaked an fd:\n" + (
            trace.getvalue()
        )
        added, deleted = file_registrations(trace.getvalue())
        assert added == deleted, trace.getvalue()
    status, output, _ = run_in_process(edu, path, io.StringIO())  # the device still works
    assert status == 0 and PASSED in output, output
    print(
        f"\n{path}: {len(walked(calls))} run-time and teardown faults injected in process "
        f"({len(run_calls)} during the run), {errors} failed the run, 0 fds leaked"
    )


# ---- on the command line: the first of each call, output and status -------------------------
def run_cli(device: str, path: str, fault: str | None = None):
    env = {key: value for key, value in os.environ.items() if key != "PYVMM_FAULT_INJECT"}
    if fault is not None:
        env["PYVMM_FAULT_INJECT"] = fault
    command = ["run", GUEST, "--device", device, "--vfio", path, "--trace", "--timeout"]
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *command, str(TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.mark.parametrize("path", PATHS)
def test_run_time_faults_on_the_command_line(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    clean = run_cli(edu, path)
    assert clean.returncode == 0 and PASSED in clean.stdout, clean.stderr
    calls = calls_by_phase(clean.stderr)
    run_calls = [call for call in calls if call.phase == "run"]
    if os.environ.get("PYVMM_RIG_FAULTS_ALL"):
        chosen = walked(calls)
    else:
        firsts: dict[str, Call] = {}
        for call in run_calls:
            firsts.setdefault(call.name, call)
        chosen = list(firsts.values())
    for call in chosen:
        done = run_cli(edu, path, f"{call.position}:EIO")
        where = f"fault at call {call.position} ({call.name}):\n{done.stderr}"
        assert "[injected]" in done.stderr and "Traceback" not in done.stderr, where
        lines = [line for line in done.stderr.splitlines() if line.startswith("pyvmm: ")]
        warnings = [line for line in lines if line.startswith("pyvmm: warning: ")]
        if done.returncode % 2 == 0 and done.returncode:
            assert len(lines) - len(warnings) == 1, where
        else:
            assert lines == warnings, where  # a guest's status: pyvmm itself said nothing
        check_outcome(call, run_calls, done.returncode, done.stdout, warnings)
        added, deleted = file_registrations(done.stderr)
        assert added == deleted, where
        again = run_cli(edu, path)
        assert again.returncode == 0 and PASSED in again.stdout, f"after the {where}\n{again}"
    print(f"\n{path}: {len(chosen)} run-time faults on the command line, all ended cleanly")
