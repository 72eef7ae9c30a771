"""Fault injection while the guest drives its assigned device, on a real VFIO stack (the rig).

tests/test_rig_faults.py fails the calls of set-up and teardown around a guest that never
touches the device. Here two guests drive theirs as a driver would, and a clean traced run
shows the calls they make pyvmm do, between the `run: vCPUs start` and `run: vCPUs stopped`
marks, then those of the teardown that undoes them (a hello run never reaches these):

- `edu` (guests/edu.c): memory decoding on (pyvmm maps BAR0 as a KVM memory slot),
  registers, DMA, three INTx (wired at set-up), then MSI: INTx off, an MSI route, an irqfd,
  VFIO's trigger. Every position, in process and (first of each name) on the command line.
- `nvme_msix` (guests/nvme_msix.c): BAR0 mapped around its trapped MSI-X table, then MSI-X:
  INTx off and 65 vectors, a GSI route each. The first call of each kind in process (every
  position with PYVMM_RIG_FAULTS_ALL=1: about 140).
- `bar_move` (guests/bar_move.c): edu's BAR0 mapped, unmapped, moved and moved back: five
  memory slots created or deleted, each failure read by the check that follows it. Every
  position, in process.

Each call is failed in turn (EIO). What must follow, from pyvmm/devices/vfio_pci.py's
contract (nothing the guest does ends the run; what the host refuses is a warning and a
device that does not answer there), in the guest's own exit statuses:

- BAR0's memory slot refused: the guest's first register check reads all ones (edu.c BAD_ID,
  nvme_msix.c BAD_MSIX_TABLE).
- Any call that turns INTx off or MSI/MSI-X on refused: no interrupt arrives, and the guest
  says so after all that came before worked (edu.c MSI_TIMEOUT, nvme_msix.c NO_INTERRUPT).
- A teardown call refused: the guest had passed; the run ends 0, or with one `pyvmm: ` line
  and an even status.

Every time: a warning for a refused run-time call, no traceback, FILE_ADD and FILE_DEL
balanced in the trace, the fd set unchanged (in process), and the device still working: the
next faulted run gets as far as its expectation says, and a clean run after the walk (on the
command line, after every fault) passes. Eventfds come from os.eventfd, not a device node:
they are not traced, so not faulted.
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
#: Seconds a run may take: a guest waits 5 s for an interrupt that does not come.
TIMEOUT = 240
_LINE = re.compile(r"trace: (?:run: vCPUs (start|stopped)|(?!close\()(\w+)\((.*)\) = (\S+))")
_FLAG = re.compile(r"\b[A-Z][A-Z0-9_]{2,}\b")


def guest_status(code: int) -> int:
    """The exit status of guest_exit(code) (isa-debug-exit: (code << 1) | 1)."""
    return (code << 1) | 1


@dataclass(frozen=True)
class GuestSpec:
    """A bundled guest that drives its device, and how its failure codes read a fault."""

    guest: str
    device_variable: str
    #: A line of its output that says it passed.
    passed: str
    #: Its status when BAR0 cannot be decoded: the first register it relies on reads ones.
    bar_refused: int = 0
    #: Its status when its interrupts are never wired, and a line it prints before that.
    no_interrupt: int = 0
    reached_interrupts: str = ""
    #: Or, for a guest whose every run-time call has a meaning of its own: the status of
    #: each, in order.
    by_run_call: tuple[int, ...] = ()


EDU = GuestSpec(
    "edu",
    "PYVMM_RIG_EDU",
    passed="edu: all ok",
    bar_refused=guest_status(4),  # edu.c BAD_ID
    no_interrupt=guest_status(15),  # edu.c MSI_TIMEOUT
    reached_interrupts="intx 3 ok",  # DMA and INTx (wired at set-up) worked
)
NVME = GuestSpec(
    "nvme_msix",
    "PYVMM_RIG_NVME",
    passed="nvme: all ok",
    bar_refused=guest_status(4),  # nvme_msix.c BAD_MSIX_TABLE: the table reads back ones
    no_interrupt=guest_status(8),  # nvme_msix.c NO_INTERRUPT
    reached_interrupts="nvme: msi-x: ",
)
#: bar_move.c's five moves of edu's BAR0, each a memory slot created or deleted.
BAR_MOVE = GuestSpec(
    "bar_move",
    "PYVMM_RIG_EDU",
    passed="bar_move: back at ",
    by_run_call=(
        guest_status(3),  # mapped after sizing: refused, NOT_RESTORED (id at the place)
        # Deleted as decoding goes off: KVM keeps the slot, so the device still answers at
        # the old place once it is mapped at the new one: STILL_AT_OLD.
        guest_status(5),
        guest_status(4),  # mapped at the new place: refused, NOT_MOVED
        guest_status(6),  # deleted at the new place to move back: not remapped, NOT_BACK
        guest_status(6),  # mapped back at the old place: refused, NOT_BACK
    ),
)


@dataclass(frozen=True)
class Call:
    """One traced call, numbered as PYVMM_FAULT_INJECT counts them."""

    position: int
    name: str
    arguments: str
    phase: str  #: "set-up", "run" or "teardown"

    @property
    def kind(self) -> tuple:
        """What distinguishes calls that pyvmm makes for different reasons: the phase, the
        name, its flag words, and whether a memory slot is deleted."""
        flags = tuple(sorted(set(_FLAG.findall(self.arguments))))
        return self.phase, self.name, flags, "memory_size=0x0," in self.arguments


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


def walked(calls: list[Call], every: bool) -> list[Call]:
    """The calls the guest's run causes, during the run and in the teardown after it: all
    of them, or the first of each kind."""
    caused = [call for call in calls if call.phase != "set-up"]
    if every:
        return caused
    firsts: dict[tuple, Call] = {}
    for call in caused:
        firsts.setdefault(call.kind, call)
    return list(firsts.values())


def expected_status(spec: GuestSpec, call: Call, run_calls: list[Call]) -> int | None:
    """The exit status a fault in call must end the run with; None: 0 or an even status."""
    if call.phase == "teardown":
        return None
    if spec.by_run_call:
        assert len(run_calls) == len(spec.by_run_call), run_calls
        return spec.by_run_call[run_calls.index(call)]
    if call == run_calls[0]:
        # The first thing the guest makes pyvmm do: map BAR0 when it turns decoding on.
        assert call.name == "KVM_SET_USER_MEMORY_REGION" and "size=0x0," not in call.arguments
        return spec.bar_refused
    return spec.no_interrupt  # everything after is turning INTx off and MSI or MSI-X on


def check_outcome(
    spec: GuestSpec,
    call: Call,
    run_calls: list[Call],
    status: int,
    output: str,
    warnings: list[str],
) -> None:
    """The run that failed call ended as the module docstring says."""
    where = f"fault at call {call.position} ({call.name}({call.arguments}), {call.phase})"
    expected = expected_status(spec, call, run_calls)
    if expected is None:
        assert spec.passed in output, f"{where}: the guest did not pass:\n{output}"
        assert status % 2 == 0, f"{where}: status {status}"
        return
    assert status == expected, f"{where}: status {status}, not {expected}:\n{output}"
    assert warnings, f"{where}: no warning for the refused call"
    if spec.reached_interrupts and expected == spec.no_interrupt:  # all before worked
        assert spec.reached_interrupts in output, f"{where}:\n{output}"


# ---- in process: the fd set --------------------------------------------------------------
def run_in_process(
    spec: GuestSpec, device: str, path: str, trace: io.StringIO, fault: str | None = None
) -> tuple[int, str, list[str]]:
    """Run the guest with device assigned; (exit status, serial output, device warnings)."""
    ioctl.trace_to(trace)
    ioctl.inject_fault(fault)
    try:
        with Machine(serial="capture") as machine:
            assigned = machine.assign(device, vfio=path)
            machine.load(guest_path(spec.guest))
            result = machine.run(timeout=TIMEOUT)
        return result.exit_status, result.serial.decode(errors="replace"), assigned.warning_lines()
    finally:
        plan = ioctl._fault_plan
        ioctl.inject_fault(None)
        ioctl.trace_to(None)
        assert fault is None or (plan is not None and plan.fired), f"{fault} was never reached"


def every_position(spec: GuestSpec) -> bool:
    """edu's and bar_move's walks are short: every position. nvme_msix starts 65 vectors, a
    GSI route each (about 140 calls): the first of each kind, unless PYVMM_RIG_FAULTS_ALL
    asks for all."""
    return spec is not NVME or bool(os.environ.get("PYVMM_RIG_FAULTS_ALL"))


@pytest.mark.parametrize("spec", [EDU, NVME, BAR_MOVE], ids=lambda spec: spec.guest)
@pytest.mark.parametrize("path", PATHS)
def test_run_time_faults_in_process(spec: GuestSpec, path: str) -> None:
    device = rig_env(spec.device_variable)
    trace = io.StringIO()
    status, output, _ = run_in_process(spec, device, path, trace)
    assert status == 0 and spec.passed in output, output + trace.getvalue()
    calls = calls_by_phase(trace.getvalue())
    run_calls = [call for call in calls if call.phase == "run"]
    names = {call.name for call in run_calls}
    wanted = {"KVM_SET_USER_MEMORY_REGION", "VFIO_DEVICE_SET_IRQS", "KVM_IRQFD"}
    if not spec.by_run_call:  # a guest that turns interrupts on
        assert wanted | {"KVM_SET_GSI_ROUTING"} <= names, trace.getvalue()
    chosen = walked(calls, every_position(spec))
    errors = 0
    for call in chosen:
        before = open_fds()
        trace = io.StringIO()
        fault = f"{call.position}:EIO"
        try:
            status, output, warnings = run_in_process(spec, device, path, trace, fault)
        except PyvmmError as error:  # only teardown may fail the run itself
            assert call.phase == "teardown", f"call {call.position}: {error.message}"
            assert error.message and "\n" not in error.message
            assert int(error.exit_status) % 2 == 0
            errors += 1
        else:
            check_outcome(spec, call, run_calls, status, output, warnings)
        leaked = f"a fault at call {call.position} leaked an fd:\n{trace.getvalue()}"
        assert open_fds() == before, leaked
        added, deleted = file_registrations(trace.getvalue())
        assert added == deleted, trace.getvalue()
    status, output, _ = run_in_process(spec, device, path, io.StringIO())  # still works
    assert status == 0 and spec.passed in output, output
    print(
        f"\n{spec.guest} {path}: {len(chosen)} faults injected in process "
        f"({sum(call.phase == 'run' for call in chosen)} during the run, of "
        f"{len(run_calls)} run-time calls), {errors} failed the run, 0 fds leaked"
    )


# ---- on the command line: output and status --------------------------------------------
def run_cli(spec: GuestSpec, device: str, path: str, fault: str | None = None):
    """`pyvmm run GUEST --device DEVICE --vfio PATH --trace`, with fault injected if given."""
    env = {key: value for key, value in os.environ.items() if key != "PYVMM_FAULT_INJECT"}
    if fault is not None:
        env["PYVMM_FAULT_INJECT"] = fault
    command = ["run", spec.guest, "--device", device, "--vfio", path, "--trace", "--timeout"]
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
    """edu, the first call of each name during the run (every position of the run and its
    teardown with PYVMM_RIG_FAULTS_ALL=1), each followed by a clean run."""
    spec = EDU
    device = rig_env(spec.device_variable)
    clean = run_cli(spec, device, path)
    assert clean.returncode == 0 and spec.passed in clean.stdout, clean.stderr
    calls = calls_by_phase(clean.stderr)
    run_calls = [call for call in calls if call.phase == "run"]
    if os.environ.get("PYVMM_RIG_FAULTS_ALL"):
        chosen = walked(calls, every=True)
    else:
        firsts: dict[str, Call] = {}
        for call in run_calls:
            firsts.setdefault(call.name, call)
        chosen = list(firsts.values())
    for call in chosen:
        done = run_cli(spec, device, path, f"{call.position}:EIO")
        where = f"fault at call {call.position} ({call.name}):\n{done.stderr}"
        assert "[injected]" in done.stderr and "Traceback" not in done.stderr, where
        lines = [line for line in done.stderr.splitlines() if line.startswith("pyvmm: ")]
        warnings = [line for line in lines if line.startswith("pyvmm: warning: ")]
        if done.returncode % 2 == 0 and done.returncode:
            assert len(lines) - len(warnings) == 1, where
        else:
            assert lines == warnings, where  # a guest's status: pyvmm itself said nothing
        check_outcome(spec, call, run_calls, done.returncode, done.stdout, warnings)
        added, deleted = file_registrations(done.stderr)
        assert added == deleted, where
        again = run_cli(spec, device, path)
        assert again.returncode == 0 and spec.passed in again.stdout, f"after the {where}"
    print(f"\n{spec.guest} {path}: {len(chosen)} faults on the command line, all ended cleanly")
