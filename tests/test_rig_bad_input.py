"""Bad input to device assignment, on a real kernel VFIO stack (the nested rig).

Each case ends with one line on stderr and its own exit status, no traceback, and leaves the
devices as they were: the next run assigns edu and drives it. Then 20 assign/run/teardown
cycles, some stopped by SIGTERM mid-run, leave no file descriptor open.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm import ExitStatus, Machine, guest_path
from tests.test_rig_assign import GUEST_TIMEOUT, PATHS, rig_env

pytestmark = pytest.mark.rig


def pyvmm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", *args]


def check_failure(
    done: subprocess.CompletedProcess, status: ExitStatus, words: str, device: str = ""
) -> None:
    """One pyvmm line naming the problem (and the device as written), the status, nothing else."""
    assert done.returncode == status, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"pyvmm: {device + ': ' if device else ''}"), lines[0]
    assert words in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def edu_works(path: str) -> None:
    """The device is released and assignable: the next run drives it."""
    edu = rig_env("PYVMM_RIG_EDU")
    done = subprocess.run(
        pyvmm_command("run", "edu_regs", "--device", edu, "--vfio", path, "--timeout", "120"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "edu_regs: 3000 accesses ok" in done.stdout


def run_bad(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        pyvmm_command("run", "hello", "--timeout", "60", *args),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        **options,
    )


@pytest.mark.parametrize("path", PATHS)
def test_device_that_does_not_exist(path: str) -> None:
    done = run_bad("--device", "0000:00:1f.6", "--vfio", path)
    check_failure(done, ExitStatus.DEVICE_NOT_FOUND, "0000:00:1f.6")
    edu_works(path)


@pytest.mark.parametrize("path", PATHS)
def test_device_not_bound_to_vfio_pci(path: str) -> None:
    unbound = rig_env("PYVMM_RIG_UNBOUND")
    spelled = unbound.removeprefix("0000:")  # the short form: errors name it as written
    done = run_bad("--device", spelled, "--vfio", path)
    check_failure(done, ExitStatus.DEVICE_NOT_BOUND, f"pyvmm bind {unbound}", spelled)
    driver = Path(f"/sys/bus/pci/devices/{unbound}/driver").resolve().name
    assert driver != "vfio-pci", "a failed run must not move the device"
    edu_works(path)


@pytest.mark.parametrize("path", PATHS)
def test_group_not_viable(path: str) -> None:
    nonviable = rig_env("PYVMM_RIG_NONVIABLE")
    spelled = nonviable.removeprefix("0000:")
    done = run_bad("--device", spelled, "--vfio", path)
    check_failure(done, ExitStatus.GROUP_NOT_VIABLE, "not viable", spelled)
    edu_works(path)


@contextlib.contextmanager
def nodes_closed_to_owner(*nodes: str) -> Iterator[None]:
    """Mode 000 on the VFIO nodes: only CAP_DAC_OVERRIDE still opens them."""
    modes = {node: os.stat(node).st_mode & 0o777 for node in nodes}
    for node in nodes:
        os.chmod(node, 0)
    try:
        yield
    finally:
        for node, mode in modes.items():
            os.chmod(node, mode)


@pytest.mark.parametrize("path", PATHS)
def test_no_permission_on_the_device_node(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    sysfs = Path(f"/sys/bus/pci/devices/{edu}")
    group = f"/dev/vfio/{os.readlink(sysfs / 'iommu_group').rsplit('/', 1)[1]}"
    cdev = f"/dev/vfio/devices/{os.listdir(sysfs / 'vfio-dev')[0]}"
    # Root without the capabilities that bypass file modes: a user the nodes don't allow.
    drop = "-dac_override,-dac_read_search"
    with nodes_closed_to_owner(group, cdev, "/dev/iommu"):
        done = subprocess.run(
            [
                "setpriv",
                f"--inh-caps={drop}",
                f"--bounding-set={drop}",
                "--",
                *pyvmm_command("run", "hello", "--timeout", "60", "--device", edu, "--vfio", path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    check_failure(done, ExitStatus.DEVICE_PERMISSION, "permission denied")
    edu_works(path)


@pytest.mark.parametrize("path", PATHS)
def test_device_in_use_by_another_process(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    holder = subprocess.Popen(
        pyvmm_command("run", "spin", "--device", edu, "--vfio", path, "--timeout", "200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "spinning\n"  # the device is open and in use
        spelled = edu.removeprefix("0000:")
        done = run_bad("--device", spelled, "--vfio", path)
        check_failure(done, ExitStatus.DEVICE_BUSY, "", spelled)
    finally:
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=60) == ExitStatus.SIGNALLED
    edu_works(path)


@pytest.mark.parametrize("path", PATHS)
def test_memlock_limit_too_low(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")

    def low_memlock_without_ipc_lock() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))

    # Without CAP_IPC_LOCK (which lifts the limit), as an ordinary user's VMM runs.
    done = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            "--",
            *pyvmm_command(
                "run",
                "hello",
                "--timeout",
                "60",
                "--device",
                edu,
                "--vfio",
                path,
                "--memory",
                "64M",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        preexec_fn=low_memlock_without_ipc_lock,
    )
    check_failure(done, ExitStatus.MEMLOCK_LIMIT, "ulimit -l")
    edu_works(path)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_twenty_cycles_some_stopped_by_sigterm() -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    before = open_fds()
    for cycle in range(20):
        path = PATHS[cycle % 2]
        stopped = cycle % 4 == 3
        with Machine(memory="16M", serial="capture") as machine:
            machine.load(guest_path("spin" if stopped else "edu_regs"))
            machine.assign(edu, vfio=path)
            if stopped:
                timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
                timer.start()
            started = time.monotonic()
            result = machine.run(timeout=GUEST_TIMEOUT)
        if stopped:
            timer.join()
            assert result.exit_status == ExitStatus.SIGNALLED, (cycle, result.message)
            assert "spinning" in result.serial_text
        else:
            assert result.exit_status == 0, (cycle, result.serial_text, result.message)
            assert "edu_regs: 3000 accesses ok" in result.serial_text
        assert open_fds() == before, f"cycle {cycle} ({path}) left fds open"
        print(f"cycle {cycle} {path}: {result.outcome} in {time.monotonic() - started:.1f}s")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("guest", "extra", "status"),
    [
        ("spin", ("--timeout", "3"), ExitStatus.TIMEOUT),
        ("triple_fault", ("--timeout", "120"), ExitStatus.TRIPLE_FAULT),
    ],
)
def test_teardown_after_a_timeout_or_a_crash(
    guest: str, extra: tuple, status: int, path: str
) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    done = subprocess.run(
        pyvmm_command("run", guest, "--device", edu, "--vfio", path, "--trace", *extra),
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    assert "KVM_DEV_VFIO_FILE_DEL" in done.stderr, "teardown ran"
    edu_works(path)
