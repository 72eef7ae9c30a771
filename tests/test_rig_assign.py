"""Device assignment through pyvmm, on a real kernel VFIO stack (the nested rig).

Each test runs on both VFIO paths: the legacy container/group and the device cdev with
iommufd. Guests find their device by PCI enumeration and drive it as a driver would; the
host side checks what the guest said, what --trace shows pyvmm did, and --stats' counts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pyvmm import Machine, guest_path
from tests.test_rig_order import Probe, probe  # noqa: F401 (a fixture)

pytestmark = pytest.mark.rig
PATHS = ["group", "cdev"]
#: Every guest run here ends by this many seconds (the rig's guest-side speed is TCG's).
GUEST_TIMEOUT = 240


def rig_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"the rig has no {name}")
    return value


def pyvmm(*args: str, timeout: float = GUEST_TIMEOUT + 60) -> subprocess.CompletedProcess:
    """Run the pyvmm command; the guest's own --timeout ends it first."""
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_guest(guest: str, device: str, path: str, *extra: str) -> subprocess.CompletedProcess:
    return pyvmm(
        "run", guest, "--device", device, "--vfio", path, "--timeout", str(GUEST_TIMEOUT), *extra
    )


def trace_lines(stderr: str) -> list[str]:
    return [line[len("trace: ") :] for line in stderr.splitlines() if line.startswith("trace: ")]


def index_of(lines: list[str], pattern: str) -> int:
    for i, line in enumerate(lines):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no trace line matches {pattern!r}:\n" + "\n".join(lines))


@pytest.mark.parametrize("path", PATHS)
def test_edu_registers_dma_intx_msi(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    done = run_guest("edu", edu, path, "--trace", "--stats")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for line in (
        "edu: id 0x010000ed",
        "edu: liveness ok",
        "edu: 5! = 120, 10! = 3628800",
        "intx 1 ok",
        "intx 2 ok",
        "intx 3 ok",
        "msi 1 ok",
        "msi 2 ok",
        "msi 3 ok",
        "edu: all ok",
    ):
        assert line in out, out
    assert re.search(r"dma ok: \d+ bytes at 0x", out), out
    trace = trace_lines(done.stderr)
    # BAR0 became a memory slot: the register accesses above caused no exits.
    index_of(trace, r"KVM_SET_USER_MEMORY_REGION\(slot=\d+, guest_phys_addr=0xc0000000")
    assert "BAR0" not in done.stderr.split("pyvmm: stats:", 1)[1], done.stderr
    # INTx went through an irqfd with resample and VFIO unmask; MSI through an MSI route.
    index_of(trace, r"KVM_IRQFD\(fd=\d+, gsi=\d+, KVM_IRQFD_FLAG_RESAMPLE")
    index_of(trace, r"VFIO_DEVICE_SET_IRQS\(INTX, DATA_EVENTFD\|ACTION_UNMASK.* = 0")
    index_of(trace, r"VFIO_DEVICE_SET_IRQS\(MSI, DATA_EVENTFD\|ACTION_TRIGGER.* = 0")


@pytest.mark.parametrize("path", PATHS)
def test_file_add_precedes_open_and_file_del_follows_close(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    done = run_guest("edu_regs", edu, path, "--trace")
    assert done.returncode == 0, done.stdout + done.stderr
    trace = trace_lines(done.stderr)
    add = index_of(trace, r"KVM_SET_DEVICE_ATTR\(.*KVM_DEV_VFIO_FILE_ADD.* = 0")
    delete = index_of(trace, r"KVM_SET_DEVICE_ATTR\(.*KVM_DEV_VFIO_FILE_DEL.* = 0")
    if path == "group":
        registered = re.search(r"fd (\d+) /dev/vfio/\d+\)", trace[add])
        assert registered, trace[add]
        opened = index_of(trace, r"VFIO_GROUP_GET_DEVICE_FD\(.* = \d+")
        closed = index_of(trace, r"close\(device ")
        assert add < opened < closed < delete
        assert delete < index_of(trace, r"close\(/dev/vfio/\d+,")
    else:
        opened = index_of(trace, r"VFIO_DEVICE_BIND_IOMMUFD\(.* = 0")
        detached = index_of(trace, r"VFIO_DEVICE_DETACH_IOMMUFD_PT\(.* = 0")
        closed = index_of(trace, r"close\(/dev/vfio/devices/vfio\d+,")
        # The cdev fd is the device: KVM holds the file until FILE_DEL, so the close after
        # it is the one that releases the device.
        assert add < opened < detached < delete < closed


@pytest.mark.parametrize("path", PATHS)
def test_kvm_pointer_reaches_the_device_at_open(path: str, probe: Probe) -> None:  # noqa: F811
    edu = rig_env("PYVMM_RIG_EDU")
    probe.clear()
    with Machine(memory="16M", serial="capture") as machine:
        machine.assign(edu, vfio=path)
        kvms, safe_hits = probe.read()
    assert kvms and all(kvms), f"the open saw kvm pointers {kvms}"
    assert safe_hits >= 1


@pytest.mark.parametrize("path", PATHS)
def test_dma_data_checked_on_the_host_side(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    with Machine(memory="64M", serial="capture") as machine:
        machine.load(guest_path("edu"))
        machine.assign(edu, vfio=path)
        result = machine.run(timeout=GUEST_TIMEOUT)
        assert result.exit_status == 0, result.serial_text + result.message
        match = re.search(r"dma ok: (\d+) bytes at (0x[0-9a-f]+)", result.serial_text)
        assert match, result.serial_text
        size, address = int(match.group(1)), int(match.group(2), 16)
        landed = machine.memory.read(address, size)
    # What edu wrote into guest RAM by DMA, seen from the host: edu.c's PATTERN(i).
    assert landed == bytes((i * 7 + 0xED) & 0xFF for i in range(size))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variable", ["PYVMM_RIG_MTTY", "PYVMM_RIG_MTTY_KVM"])
def test_mtty_loopback_and_automasked_intx(path: str, variable: str) -> None:
    mdev = rig_env(variable)
    done = run_guest("mtty", mdev, path, "--trace")
    assert done.returncode == 0, done.stdout + done.stderr
    for n in (1, 2, 3):
        assert re.search(rf'mtty rx irq {n} ok: "ping{n}"', done.stdout), done.stdout
    assert "mtty: all ok" in done.stdout
    # mtty refuses the unmask eventfd: pyvmm unmasks after each EOI itself.
    unmasks = [
        line
        for line in trace_lines(done.stderr)
        if line.startswith("VFIO_DEVICE_SET_IRQS(INTX, DATA_NONE|ACTION_UNMASK")
    ]
    assert len(unmasks) >= 3, done.stderr


@pytest.mark.parametrize("path", PATHS)
def test_nvme_msix_with_table_trapped(path: str) -> None:
    nvme = rig_env("PYVMM_RIG_NVME")
    done = run_guest("nvme_msix", nvme, path, "--trace", "--stats")
    assert done.returncode == 0, done.stdout + done.stderr
    for n in (1, 2, 3):
        assert f"nvme identify {n} ok" in done.stdout, done.stdout
    assert "nvme: all ok" in done.stdout
    trace = trace_lines(done.stderr)
    index_of(trace, r"VFIO_DEVICE_SET_IRQS\(MSIX, DATA_EVENTFD\|ACTION_TRIGGER.* = 0")
    # The registers around the table are a memory slot; the table's page is trapped in C.
    index_of(trace, r"KVM_SET_USER_MEMORY_REGION\(slot=\d+, guest_phys_addr=0xc0000000")
    stats = done.stderr.split("pyvmm: stats:", 1)[1]
    assert re.search(r"MSI-X table: \d+ accesses, served in C", stats), stats


def bar_hits(stderr: str) -> int:
    match = re.search(r"MMIO 0x[0-9a-f]+ \S+ BAR0: (\d+) accesses, served in C", stderr)
    return int(match.group(1)) if match else 0


@pytest.mark.parametrize("path", PATHS)
def test_bar_mapped_costs_no_exits_trapped_costs_one_each(path: str, record_property) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    mapped = run_guest("edu_regs", edu, path, "--stats")
    trapped = run_guest("edu_regs", edu, path, "--stats", "--no-mmap")
    for done in (mapped, trapped):
        assert done.returncode == 0, done.stdout + done.stderr
        assert "edu_regs: 3000 accesses ok" in done.stdout
    assert bar_hits(mapped.stderr) == 0
    exits = [int(re.search(r"stats: (\d+) exits", d.stderr).group(1)) for d in (mapped, trapped)]
    python = [int(re.search(r"(\d+) reached Python", d.stderr).group(1)) for d in (mapped, trapped)]
    # Trapped: every one of the 3000 accesses is an MMIO exit, served in C, not in Python.
    assert bar_hits(trapped.stderr) >= 3000
    assert exits[1] - exits[0] >= 3000
    assert python[1] - python[0] < 10
    record_property("edu_regs_exits", f"mapped {exits[0]}, trapped {exits[1]}")
    print(f"\nedu_regs: mapped {exits[0]} exits, trapped {exits[1]} exits")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mapping", ["mmap", "trap"])
def test_guest_sizes_and_moves_a_bar(mapping: str, path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    extra = ("--no-mmap",) if mapping == "trap" else ()
    done = run_guest("bar_move", edu, path, "--trace", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bar_move: moved to 0xc8000000, old place empty" in done.stdout
    assert "bar_move: back at 0xc0000000" in done.stdout
    if mapping == "mmap":  # the memory slot followed the BAR there and back
        trace = trace_lines(done.stderr)
        index_of(trace, r"KVM_SET_USER_MEMORY_REGION\(slot=\d+, guest_phys_addr=0xc8000000, m")


@pytest.mark.parametrize("path", PATHS)
def test_two_devices_take_consecutive_slots(path: str) -> None:
    edu, mtty = rig_env("PYVMM_RIG_EDU"), rig_env("PYVMM_RIG_MTTY")
    args = ("--device", mtty, "--vfio", path, "--timeout", str(GUEST_TIMEOUT))
    first = pyvmm("run", "edu_regs", "--device", edu, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    second = pyvmm("run", "mtty", "--device", edu, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "mtty: found 4348:3253 at 00:02.0" in second.stdout
