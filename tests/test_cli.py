"""The pyvmm command: the default guest, and every failure mode with its line and status."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm import ExitStatus, guest_path

pytestmark = pytest.mark.usefixtures("kvm_required")


def start_pyvmm(*args: str, stdin: int) -> subprocess.Popen:
    """Start the pyvmm command in the background, its output in text pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "pyvmm", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_one_line_error(completed: subprocess.CompletedProcess, status: int, text: str) -> None:
    assert completed.returncode == status, completed.stderr
    assert "Traceback" not in completed.stderr
    first = completed.stderr.splitlines()[0]
    assert first.startswith("pyvmm: ") and text in first, completed.stderr


def test_default_guest_is_hello(pyvmm_cli):
    completed = pyvmm_cli("run")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "Hello from a pyvmm guest!\n"
    assert completed.stderr == ""


def test_guest_exit_status_passes_through(pyvmm_cli):
    completed = pyvmm_cli("run", "unclaimed_mmio")
    assert completed.returncode == 5
    assert "warning: 2 unclaimed MMIO accesses" in completed.stderr


def test_serial_to_file(pyvmm_cli, tmp_path):
    out = tmp_path / "serial.log"
    completed = pyvmm_cli("run", "smp", "--cpus", "2", "--serial", f"file:{out}")
    assert completed.returncode == 0 and completed.stdout == ""
    assert out.read_text().splitlines()[-1] == "all 2 cpus reported"


def test_serial_input_from_stdin(pyvmm_cli):
    completed = pyvmm_cli("run", "echo", "--timeout", "60", input="ping\n", stdin=None)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "type a line\ngot: ping\n"


def test_serial_input_interrupts_with_irqchip():
    # stdin arrives only after the guest is halted waiting for IRQ 4.
    process = start_pyvmm("run", "uart_irq", "--irqchip", "--timeout", "60", stdin=subprocess.PIPE)
    try:
        assert process.stdout.readline() == "waiting for input on IRQ 4\n"
        process.stdin.write("q")
        process.stdin.close()
        process.wait(timeout=60)
        stdout, stderr = process.stdout.read(), process.stderr.read()
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stdout == "irq 4 delivered 'q'\n"


def test_internal_error(pyvmm_cli):
    completed = pyvmm_cli("run", "bad_fetch")
    assert_one_line_error(
        completed, ExitStatus.INTERNAL_ERROR, "KVM internal error on vCPU 0: instruction emulation"
    )
    assert "rip=0x00000000e0000000" in completed.stderr


def test_missing_image(pyvmm_cli, tmp_path):
    completed = pyvmm_cli("run", str(tmp_path / "nope.elf"))
    assert_one_line_error(completed, ExitStatus.BAD_IMAGE, "not found")
    assert len(completed.stderr.splitlines()) == 1


def malformed_images(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    hello = guest_path("hello").read_bytes()
    foreign = bytearray(hello)
    foreign[18:20] = (183).to_bytes(2, "little")  # e_machine = EM_AARCH64
    bad_phoff = bytearray(hello)
    bad_phoff[32:40] = (1 << 40).to_bytes(8, "little")  # program headers far past EOF
    cases = {
        "garbage": (b"this is not an ELF file at all" * 10, "not an ELF file"),
        "truncated": (hello[:600], "truncated"),
        "header-only": (hello[:20], "malformed"),
        "foreign": (bytes(foreign), "EM_AARCH64, not x86"),
        "bad-phoff": (bytes(bad_phoff), "malformed"),
    }
    images = {}
    for name, (data, text) in cases.items():
        path = tmp_path / f"{name}.elf"
        path.write_bytes(data)
        images[name] = (path, text)
    return images


@pytest.mark.parametrize("case", ["garbage", "truncated", "header-only", "foreign", "bad-phoff"])
def test_malformed_images(pyvmm_cli, tmp_path, case):
    path, text = malformed_images(tmp_path)[case]
    completed = pyvmm_cli("run", str(path))
    assert_one_line_error(completed, ExitStatus.BAD_IMAGE, text)
    assert len(completed.stderr.splitlines()) == 1


def test_image_too_big_for_memory(pyvmm_cli):
    completed = pyvmm_cli("run", "hello", "--memory", "2M")
    assert_one_line_error(completed, ExitStatus.BAD_IMAGE, "give it more --memory")


def test_missing_kvm(pyvmm_cli, tmp_path):
    completed = pyvmm_cli("run", "--kvm-device", str(tmp_path / "kvm"))
    assert_one_line_error(completed, ExitStatus.NO_KVM, "does not exist")


def test_kvm_not_permitted(pyvmm_cli):
    # Root may open almost anything; a read-only sysctl is refused with EACCES even to root.
    completed = pyvmm_cli("run", "--kvm-device", "/proc/sys/kernel/osrelease")
    assert_one_line_error(completed, ExitStatus.NO_KVM, "permission denied")


def test_kvm_device_that_is_not_kvm(pyvmm_cli):
    completed = pyvmm_cli("run", "--kvm-device", "/dev/null")
    assert_one_line_error(completed, ExitStatus.NO_KVM, "/dev/null")


def test_triple_fault(pyvmm_cli):
    completed = pyvmm_cli("run", "triple_fault")
    assert_one_line_error(completed, ExitStatus.TRIPLE_FAULT, "vCPU 0 triple-faulted")
    assert "rip=" in completed.stderr
    assert completed.stdout == "about to triple-fault\n"


def test_unclaimed_mmio_fatal(pyvmm_cli):
    completed = pyvmm_cli("run", "unclaimed_mmio", "--fail-on-unclaimed")
    assert_one_line_error(completed, ExitStatus.UNCLAIMED_ACCESS, "unclaimed MMIO read")


def test_timeout(pyvmm_cli):
    completed = pyvmm_cli("run", "spin", "--timeout", "0.5")
    assert_one_line_error(completed, ExitStatus.TIMEOUT, "after the 0.5 s timeout")
    assert completed.stdout == "spinning\n"


def test_halted_forever(pyvmm_cli):
    completed = pyvmm_cli("run", "wait_irq")
    assert_one_line_error(completed, ExitStatus.HALTED_FOREVER, "nothing can wake it")


@pytest.mark.parametrize(
    "args",
    [("--memory", "lots"), ("--cpus", "0"), ("--serial", "tcp:1234"), ("--memory", "100")],
)
def test_bad_configuration(pyvmm_cli, args):
    completed = pyvmm_cli("run", *args)
    assert_one_line_error(completed, ExitStatus.USAGE, "")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_guest(signum):
    process = start_pyvmm("run", "spin", "--cpus", "2", stdin=subprocess.DEVNULL)
    try:
        assert process.stdout.readline() == "spinning\n"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == ExitStatus.SIGNALLED, stderr
    assert stderr.splitlines()[0] == f"pyvmm: stopped by {signal.Signals(signum).name}"
    assert "Traceback" not in stderr


def test_trace_and_stats(pyvmm_cli):
    completed = pyvmm_cli("run", "hello", "--trace", "--stats", "--timeout", "60")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stderr.splitlines()
    trace = [line for line in lines if line.startswith("trace: ")]
    assert trace[0].startswith("trace: KVM_GET_API_VERSION(")
    assert any(line.startswith("trace: KVM_CREATE_VM(") and line.endswith(" = 4") for line in trace)
    assert any("KVM_SET_USER_MEMORY_REGION(slot=0, guest_phys_addr=0x0" in line for line in trace)
    assert not any("KVM_RUN" in line for line in trace), "run-loop exits are not traced"
    stats = [line for line in lines if line.startswith("pyvmm: stats: ")]
    assert re.match(r"pyvmm: stats: \d+ exits \(IO \d+", stats[0]), stats
    assert any("port 0x3f8 COM1:" in line and "served in C" in line for line in stats)


def test_device_that_does_not_exist(pyvmm_cli):
    completed = pyvmm_cli("run", "hello", "--device", "0000:7f:1f.7")
    assert completed.returncode == ExitStatus.DEVICE_NOT_FOUND
    assert completed.stderr.count("\n") == 1 and "pyvmm devices" in completed.stderr
