"""No hangs: every run ends within its timeout plus a small constant, whatever the consumer of
its output, its input or the guest does (issue 10).

The claims are "not hung", so the bounds are generous (this machine is slow and shared):
each run must end within its timeout (or the SIGTERM) plus SLACK seconds.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pyvmm.errors import ExitStatus
from pyvmm.guests import guest_path
from pyvmm.machine import Machine
from pyvmm.testing import open_fds

REPO = Path(__file__).resolve().parent.parent
#: Seconds a run may take past its timeout or SIGTERM before it counts as hung.
SLACK = 10.0
#: A run under test never needs longer than this, whatever it does.
HARD_LIMIT = 60.0

pytestmark = pytest.mark.usefixtures("kvm_required")


def _stalled_pipe() -> tuple[int, int]:
    """A pipe (read end, write end) already full, whose reader never reads."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(write_end, b"x" * 65536)
    except BlockingIOError:
        pass
    # The child gets this open file description: it must see an ordinary, blocking pipe.
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags)
    return read_end, write_end


class Run:
    """`pyvmm run ...` in a subprocess with the given stdin and stdout; stderr to a file."""

    def __init__(self, *args: str, stdout: int, stdin: int = subprocess.DEVNULL) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyvmm", "run", *args],
            stdin=stdin,
            stdout=stdout,
            stderr=self.stderr,
            cwd=REPO,
        )

    def wait(self, within: float) -> tuple[int, float, str]:
        """(status, seconds from now until it ended, stderr); fails if it outlives within."""
        start = time.monotonic()
        try:
            status = self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"pyvmm run still running {within:g} s later: hung")
        ended = time.monotonic() - start
        self.stderr.seek(0)
        return status, ended, self.stderr.read().decode(errors="replace")


def _read_until(fd: int, marker: bytes) -> None:
    """Read fd until marker appears: the guest is running and pyvmm's handlers are set."""
    seen = b""
    deadline = time.monotonic() + HARD_LIMIT
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} on the guest's output"
        chunk = os.read(fd, 4096)
        assert chunk, f"output ended before {marker!r}"
        seen = seen[-len(marker) :] + chunk


def _expect_timeout(run: Run, timeout: float) -> str:
    status, _, stderr = run.wait(timeout + SLACK)
    assert status == ExitStatus.TIMEOUT, stderr
    return stderr


@pytest.mark.parametrize("prefilled", [True, False], ids=["stalled", "never-read"])
def test_unread_stdout_ends_at_timeout(prefilled: bool) -> None:
    read_end, write_end = _stalled_pipe() if prefilled else os.pipe2(os.O_CLOEXEC)
    try:
        run = Run("flood", "--timeout", "2", stdout=write_end)
        stderr = _expect_timeout(run, 2 + HARD_LIMIT / 2)  # includes startup
        if prefilled:  # an empty pipe may hold all a slow machine's guest sent in 2 s
            assert "bytes of serial output dropped: the reader of stdout stopped reading" in stderr
    finally:
        os.close(read_end)
        os.close(write_end)


def _sigterm_after_stall(*args: str) -> tuple[int, float, str]:
    """Start pyvmm, read its output until the guest runs, stop reading, SIGTERM it."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        run = Run(*args, stdout=write_end)
        os.close(write_end)
        write_end = -1
        _read_until(read_end, b"flood" if args[0] == "flood" else b"spinning")
        time.sleep(2)  # a flooding guest fills the pipe by now: the reader has stalled
        run.process.send_signal(signal.SIGTERM)
        return run.wait(SLACK)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_stalled_stdout_ends_on_sigterm() -> None:
    status, _, stderr = _sigterm_after_stall("flood")
    assert status == ExitStatus.SIGNALLED, stderr
    assert "stopped by SIGTERM" in stderr


@pytest.mark.parametrize("cpus", [1, 2])
def test_spin_with_interrupts_off_ends_at_timeout(cpus: int) -> None:
    run = Run("spin_cli", "--cpus", str(cpus), "--timeout", "2", stdout=subprocess.DEVNULL)
    _expect_timeout(run, 2 + HARD_LIMIT / 2)


@pytest.mark.parametrize("cpus", [1, 2])
def test_spin_with_interrupts_off_ends_on_sigterm(cpus: int) -> None:
    status, _, stderr = _sigterm_after_stall("spin_cli", "--cpus", str(cpus))
    assert status == ExitStatus.SIGNALLED, stderr


@pytest.fixture(params=["no-writer", "writer-never-closes"])
def silent_fifo(request: pytest.FixtureRequest, tmp_path: Path):
    """A FIFO for stdin that nobody writes to: with no writer, or with one that stays open."""
    path = tmp_path / "stdin.fifo"
    os.mkfifo(path)
    # Non-blocking open: a blocking one waits for a writer, which is the test's job, not pyvmm's.
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    writer = -1
    if request.param == "writer-never-closes":
        writer = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    yield reader
    os.close(reader)
    if writer >= 0:
        os.close(writer)


def test_silent_fifo_input_ends_at_timeout(silent_fifo: int) -> None:
    run = Run("spin", "--timeout", "2", stdin=silent_fifo, stdout=subprocess.DEVNULL)
    stderr = _expect_timeout(run, 2 + HARD_LIMIT / 2)
    assert "Traceback" not in stderr


def test_silent_fifo_input_ends_on_guest_exit(silent_fifo: int, tmp_path: Path) -> None:
    output = tmp_path / "out.txt"
    with open(output, "wb") as stdout:
        run = Run("hello", stdin=silent_fifo, stdout=stdout.fileno())
        status, _, stderr = run.wait(HARD_LIMIT)
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert output.read_bytes() == b"Hello from a pyvmm guest!\n"


def test_api_run_with_stalled_serial_returns_in_time() -> None:
    read_end, write_end = _stalled_pipe()
    try:
        fds_before = open_fds()
        start = time.monotonic()
        with Machine(memory="16M", serial=write_end) as machine:
            machine.load(guest_path("flood"))
            result = machine.run(timeout=2)
            assert time.monotonic() - start < 2 + SLACK + 5  # + building the VM
            assert result.outcome == "timeout"
            # The pipe took nothing, so everything the guest sent is dropped and counted.
            assert 0 < result.serial_dropped == machine.serial.bytes_out
        assert time.monotonic() - start < 2 + SLACK + 5
        assert open_fds() == fds_before  # the writer's reopened pipe and eventfd are closed
    finally:
        os.close(read_end)
        os.close(write_end)


def test_file_output_keeps_every_byte(tmp_path: Path) -> None:
    # A regular file never stalls: no ring, no drops, every transmitted byte lands.
    output = tmp_path / "flood.txt"
    with Machine(memory="16M", serial=f"file:{output}") as machine:
        machine.load(guest_path("flood"))
        result = machine.run(timeout=1)
        sent = machine.serial.bytes_out
    assert result.serial_dropped == 0
    assert sent > 0 and output.stat().st_size == sent


def test_closed_reader_ends_at_timeout_with_status_unchanged() -> None:
    # `pyvmm run flood | head -c 100`: the reader goes away; the rest is dropped and counted.
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    run = Run("flood", "--timeout", "2", stdout=write_end)
    os.close(write_end)
    _read_until(read_end, b"flood")
    os.close(read_end)
    stderr = _expect_timeout(run, 2 + HARD_LIMIT / 2)
    assert "bytes of serial output dropped: the reader of stdout stopped reading" in stderr
    assert "Traceback" not in stderr


def test_blocked_python_handler_is_named(capfd: pytest.CaptureFixture[str]) -> None:
    # A Python device handler that blocks holds its vCPU: the run cannot free what that
    # thread uses, so it waits, but it says which handler it waits for.
    def blocking_handler(_offset: int, _data: memoryview, _is_write: bool) -> None:
        time.sleep(9)  # past the timeout plus the 5 s after which the warning comes

    with Machine(memory="16M", serial="capture") as machine:
        machine.load(guest_path("pio_mmio"))  # its first access is port 0x500
        machine.add_pio(0x500, 8, blocking_handler, "blocking-dev")
        result = machine.run(timeout=2)
    assert result.outcome == "timeout"
    assert "vCPU 0 has not stopped 5 s after the stop: its device handler (blocking-dev)" in (
        capfd.readouterr().err
    )
