"""Bad input from a user never gives a false status: one line, an even status, no traceback,
no hang, no leaked fd; and pyvmm's own bugs exit 40, never a guest's odd status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pyvmm
from pyvmm import ExitStatus, Machine, guest_path
from pyvmm import cli as pyvmm_cli_module
from pyvmm.boot import load_guest
from pyvmm.devices.fw_cfg import FW_CFG_CMDLINE_DATA
from pyvmm.errors import ConfigurationError, DeviceHandlerError, GuestImageError
from pyvmm.linux import COMMAND_LINE
from pyvmm.memory import GuestMemory, host_memory_limit
from tests.test_linux import bzimage
from tests.test_loader import elf64

pytestmark = pytest.mark.usefixtures("kvm_required")

#: What any of these runs may take at most: a hang is what is being tested against.
RUN_TIMEOUT = 60


def open_fds() -> set[str]:
    """This process's open fds (the listing's own fd comes and goes with it)."""
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves an fd open that was not open before."""
    before = open_fds()
    yield
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before if fd.isdigit()}
    leaked = {fd: target for fd, target in leaked.items() if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"leaked fds: {leaked}"


def assert_refused(completed: subprocess.CompletedProcess, status: int, words: str) -> None:
    """One line on stderr (after argparse's usage, for a usage error) naming the problem."""
    stderr = completed.stderr if isinstance(completed.stderr, str) else completed.stderr.decode()
    assert completed.returncode == status, stderr
    assert status % 2 == 0
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if not line.startswith(("usage:", "  "))]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(("pyvmm: ", "pyvmm run: error: ")) and words in lines[0], stderr


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--timeout", "inf"], "'inf' is not a finite, non-negative number"),
        (["--timeout", "nan"], "'nan' is not a finite"),
        (["--timeout", "-1"], "'-1' is not a finite"),
        (["--timeout", "soon"], "'soon' is not a number of seconds"),
        (["--serial", "capture"], "capture is for the Python API"),
        (["--memory", "100000T"], "more than this host can back"),
        (["--memory", "12X"], "bad memory size"),
    ],
)
def test_bad_values_are_usage_errors(pyvmm_cli, args: list[str], words: str) -> None:
    assert_refused(pyvmm_cli("run", *args, timeout=RUN_TIMEOUT), ExitStatus.USAGE, words)


def test_memory_beyond_the_host_fails_at_once_with_the_limit(no_fd_leak) -> None:
    limit = host_memory_limit()
    if limit is None:
        pytest.skip("this host reports no memory limit (/proc/meminfo, RLIMIT_AS)")
    too_much = (limit[0] // (1 << 30) + 1) << 30
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=r"at most [\d.]+ GiB \(") as raised:
        Machine(memory=too_much)
    # The claim is speed: refused before KVM's memory slot set-up (seconds at this size).
    assert time.monotonic() - started < 2
    assert "\n" not in raised.value.message


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "directory"])
def test_only_regular_files_are_booted(pyvmm_cli, tmp_path: Path, fifo: Path, special) -> None:
    path = {"fifo": fifo, "directory": tmp_path}.get(special, special)
    completed = pyvmm_cli("run", str(path), "--timeout", "5", timeout=RUN_TIMEOUT)
    assert_refused(completed, ExitStatus.BAD_IMAGE, f"guest image {path} is a")


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("kernel", ["multiboot", "linux"])
def test_an_initrd_that_is_no_regular_file_is_refused(
    pyvmm_cli, tmp_path: Path, fifo: Path, special: str, kernel: str
) -> None:
    path = fifo if special == "fifo" else special
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage())
    guest = str(guest_path("multiboot_info")) if kernel == "multiboot" else str(image)
    completed = pyvmm_cli(
        "run", guest, "--initrd", str(path), "--timeout", "5", timeout=RUN_TIMEOUT
    )
    assert_refused(completed, ExitStatus.BAD_IMAGE, f"{path} is a")
    assert "not a regular file" in completed.stderr


def test_a_firmware_image_that_is_no_regular_file_is_refused(pyvmm_cli, fifo: Path) -> None:
    completed = pyvmm_cli("run", "--firmware", str(fifo), "hello", timeout=RUN_TIMEOUT)
    assert_refused(completed, ExitStatus.BAD_IMAGE, f"firmware image {fifo} is a FIFO")


@pytest.mark.parametrize("length", [0x203, 0x206, 0x240, 0x26B])
def test_a_bzimage_cut_inside_its_setup_header_is_refused(
    pyvmm_cli, tmp_path: Path, length: int
) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage()[:length])
    completed = pyvmm_cli("run", str(path), "--boot", "linux", timeout=RUN_TIMEOUT)
    assert_refused(completed, ExitStatus.BAD_IMAGE, "")


def test_bad_files_leak_no_fd_in_process(tmp_path: Path, fifo: Path, no_fd_leak) -> None:
    short = tmp_path / "short"
    short.write_bytes(bzimage()[:0x240])
    for guest, initrd in [
        (fifo, ()),
        ("/dev/zero", ()),
        (tmp_path, ()),
        (short, ()),
        (guest_path("multiboot_info"), (str(fifo),)),
        (guest_path("multiboot_info"), ("/dev/zero",)),
    ]:
        with Machine(serial="capture") as machine, pytest.raises(GuestImageError):
            machine.load(guest, initrd=initrd)


def test_a_command_line_that_is_not_utf8_reaches_the_guest_as_typed(pyvmm_cli) -> None:
    append = b"a=\xff\xfe b"
    completed = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "multiboot_info", "--append", append,
         "--timeout", "50"],
        capture_output=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert b"Traceback" not in completed.stderr
    assert b" " + append + b'"\n' in completed.stdout


def test_a_linux_command_line_in_bytes_lands_in_guest_ram(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage())
    with Machine(serial="capture") as machine:
        machine.load(image, append=b"console=\xe9")
        assert machine.memory.read(COMMAND_LINE, 10) == b"console=\xe9\0"
        assert machine.fw_cfg.item(FW_CFG_CMDLINE_DATA) == b"console=\xe9\0"


def test_a_raising_device_handler_is_a_device_error(no_fd_leak) -> None:
    def broken(offset: int, data: memoryview, is_write: bool) -> None:
        raise ValueError("register 3 is\nnot implemented")

    with Machine(serial="capture") as machine:
        machine.load(guest_path("pio_mmio"))
        machine.add_pio(0x500, 8, broken, "broken device")
        with pytest.raises(DeviceHandlerError) as raised:
            machine.run(timeout=30)
    assert raised.value.exit_status == ExitStatus.DEVICE_ERROR
    assert isinstance(raised.value.__cause__, ValueError)
    assert "broken device" in raised.value.message and "\n" not in raised.value.message
    assert "ValueError: register 3 is not implemented" in raised.value.message


def test_an_internal_error_exits_40_in_one_line(monkeypatch, capsys) -> None:
    def bug(args: object) -> int:
        raise ZeroDivisionError("division\nby zero")

    monkeypatch.setattr(pyvmm_cli_module, "run_command", bug)
    monkeypatch.delenv("PYVMM_DEBUG", raising=False)
    assert pyvmm_cli_module.main(["run"]) == ExitStatus.INTERNAL_BUG == 40
    stderr = capsys.readouterr().err
    assert stderr == (
        "pyvmm: internal error: ZeroDivisionError: division by zero (run with --debug for the "
        "traceback; please report it)\n"
    )
    assert pyvmm_cli_module.main(["run", "--debug"]) == 40
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("PYVMM_DEBUG", "1")
    assert pyvmm_cli_module.main(["run"]) == 40
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_outside_a_run_is_status_18(monkeypatch, capsys) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(pyvmm_cli_module, "run_command", interrupted)
    assert pyvmm_cli_module.main(["run"]) == ExitStatus.SIGNALLED
    assert capsys.readouterr().err == "pyvmm: interrupted (SIGINT)\n"


def test_a_file_in_the_current_directory_beats_a_bundled_name(pyvmm_cli, tmp_path: Path) -> None:
    (tmp_path / "hello").write_bytes(b"not a guest")
    # The pyvmm under test, not whichever one the other directory would import.
    env = {**os.environ, "PYTHONPATH": str(Path(pyvmm.__file__).parents[1])}
    completed = pyvmm_cli("run", "hello", timeout=RUN_TIMEOUT, cwd=tmp_path, env=env)
    assert_refused(completed, ExitStatus.BAD_IMAGE, "hello is not an ELF file")


def test_ram_limit_messages_name_the_real_limit(tmp_path: Path) -> None:
    # The Linux page-table limit (layout.py) is named by tests/test_layout.py; here, the RAM
    # regions an ELF segment must lie in.
    elf = elf64(tmp_path / "high.elf", [(0xC000_0000, b"x", 0x1000)], 0xC000_0000)
    memory = GuestMemory("5G")
    try:
        with pytest.raises(GuestImageError, match=r"\(\[0x100000, 0xc0000000\) and \[0x1"):
            load_guest(memory, elf)
    finally:
        memory.close()
