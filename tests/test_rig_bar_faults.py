"""A trapped BAR access the device refuses is the guest's problem, on a real kernel (the rig).

vfio-pci refuses reads and writes of a memory BAR with EIO while memory decode is off in its
view of the command register (its virtual config space, which only the VFIO user's config writes
change: clearing the bit in the physical register through sysfs, as setpci would, fails nothing;
the guest then just reads zeros from the edu device). The test makes that happen mid-run: the
guest, bar_fault, writes 1 to the test's fault switch port when it wants its BAR refused, and
the switch clears the memory bit through the device's VFIO config region, behind pyvmm's
emulated command register, so BAR0 stays trapped and every access to it fails in the kernel. As
QEMU's vfio_region_read/write, pyvmm gives the guest all ones and drops the write; the guest
checks that, has the switch turn decode back on, checks the device answers again, and ends with
its own status. The warning names the device as the user wrote it, the BAR, the first offset,
the errno and the count. The same for an NVMe controller's MSI-X pending bit array (pba_fault),
which pyvmm forwards from a trapped page while the rest of the BAR is mmap'd.
"""

from __future__ import annotations

import errno
import re

import pytest

from pyvmm import Machine, guest_path
from pyvmm._native import lib
from pyvmm.devices.vfio_pci import VfioPciDevice
from pyvmm.pci import config as pci
from pyvmm.vfio import VfioDevice
from tests.test_rig_assign import GUEST_TIMEOUT, PATHS, rig_env

pytestmark = pytest.mark.rig
FAULT_SWITCH_PORT = 0x530
GUEST_DONE_STATUS = (21 << 1) | 1
#: In the refused window: the ID read, the liveness write, the liveness read.
REFUSED_ACCESSES = 3
PBA_GUEST_DONE_STATUS = (22 << 1) | 1


class FaultSwitch:
    """The guest's fault switch port: a 1 clears memory decode in vfio-pci's view of the
    command register (the device then refuses memory BAR accesses with EIO), a 0 sets it."""

    def __init__(self, vfio: VfioDevice) -> None:
        self.vfio = vfio
        self.written: list[int] = []

    def __call__(self, offset: int, data: memoryview, is_write: bool) -> None:
        if not is_write:
            data[:] = b"\xff" * len(data)
            return
        config = lib.VFIO_PCI_CONFIG_REGION_INDEX
        command = self.vfio.read(config, pci.COMMAND, 2)
        if data[0]:
            command &= ~pci.COMMAND_MEMORY
        else:
            command |= pci.COMMAND_MEMORY
        self.vfio.write(config, pci.COMMAND, 2, command)
        self.written.append(data[0])


def refusal_lines(assigned: VfioPciDevice) -> list[str]:
    return [line for line in assigned.warning_lines() if "refused by the device" in line]


@pytest.mark.parametrize("path", PATHS)
def test_refused_bar_access_reads_ones_and_the_run_goes_on(path: str) -> None:
    edu = rig_env("PYVMM_RIG_EDU")
    as_written = f"/sys/bus/pci/devices/{edu}"  # not the VFIO name: the warning must say this
    with Machine(memory="16M", serial="capture") as machine:
        machine.load(guest_path("bar_fault"))
        assigned = machine.assign(as_written, vfio=path, mmap=False)
        switch = FaultSwitch(assigned.device)
        machine.add_pio(FAULT_SWITCH_PORT, 1, switch, "fault switch")
        result = machine.run(timeout=GUEST_TIMEOUT)
        lines = refusal_lines(assigned)
        faults = assigned.bars[0].faults
        first = faults.first
    out = result.serial_text
    assert (result.outcome, result.exit_status) == ("exit", GUEST_DONE_STATUS), out + result.message
    assert switch.written == [1, 0]
    assert "bar_fault: refused: id 0xffffffff liveness 0xffffffff" in out, out
    assert "bar_fault: restored: id 0x010000ed liveness ok" in out, out
    assert faults.count == REFUSED_ACCESSES
    assert first is not None
    assert (first.errno, first.size, first.is_write) == (errno.EIO, 4, False)
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"{re.escape(as_written)}: BAR0: {REFUSED_ACCESSES} accesses refused by the device, "
        r"the first a read of 4 bytes at offset 0x0: EIO \(Input/output error\); "
        r"the guest read all ones and its writes were dropped",
        lines[0],
    ), lines[0]


@pytest.mark.parametrize("path", PATHS)
def test_refused_pba_read_in_the_msix_window_reads_ones(path: str) -> None:
    """The PBA shares its BAR with the MSI-X table and is forwarded from the table's window
    or a trapped page of its own, never mmap'd: the same refusal, the same answer."""
    nvme = rig_env("PYVMM_RIG_NVME")
    with Machine(memory="16M", serial="capture") as machine:
        machine.load(guest_path("pba_fault"))
        assigned = machine.assign(nvme, vfio=path)  # mmap on: only the MSI-X pages are trapped
        switch = FaultSwitch(assigned.device)
        machine.add_pio(FAULT_SWITCH_PORT, 1, switch, "fault switch")
        result = machine.run(timeout=GUEST_TIMEOUT)
        lines = refusal_lines(assigned)
    out = result.serial_text
    assert (result.outcome, result.exit_status) == ("exit", PBA_GUEST_DONE_STATUS), (
        out + result.message
    )
    assert switch.written == [1, 0]
    assert "pba_fault: refused: pba 0xffffffff" in out, out
    assert "pba_fault: restored: pba 0x00000000" in out, out
    where = re.search(r"pba_fault: pba in bar (\d) at (0x[0-9a-f]+)", out)
    assert where, out
    assert lines == [
        f"{nvme}: BAR{where.group(1)}: 1 access refused by the device, the first a read of 4 "
        f"bytes at offset {where.group(2)}: EIO (Input/output error); the guest read all ones "
        "and its writes were dropped"
    ]
