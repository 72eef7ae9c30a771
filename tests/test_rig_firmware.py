"""Linux through pyvmm's own firmware, in the nested rig: Debian's stock kernel, started from
the reset vector, loaded by the firmware from fw_cfg and entered by the 64-bit boot protocol,
boots to the initramfs marker and powers off, as tests/test_rig_linux.py shows on the direct
path (whose helpers these reuse).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.test_rig_assign import PATHS, rig_env, run_guest
from tests.test_rig_linux import boot_linux, marker

pytestmark = pytest.mark.rig


def test_linux_boots_through_the_firmware_and_powers_off(tmp_path: Path, record_property) -> None:
    started = time.monotonic()
    done = boot_linux(tmp_path, "--stats", "--firmware")
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    uptime, cpus = marker(done.stdout)
    assert cpus == 1
    assert "Traceback" not in done.stderr
    # The firmware's part: it read the kernel, the initrd, the command line and the zero page
    # by fw_cfg DMA (port 0x514, a few accesses), not a byte at a time through port 0x511.
    dma = re.search(r"port 0x514 fw_cfg-dma: (\d+) accesses", done.stderr)
    assert dma and int(dma.group(1)) < 40, done.stderr
    exits = re.search(r"stats: (\d+) exits", done.stderr)
    record_property("linux_firmware_uptime_at_marker_s", uptime)
    record_property("linux_firmware_wall_s", round(wall, 2))
    record_property("linux_firmware_exits", int(exits.group(1)) if exits else -1)
    print(
        f"\nLinux through the firmware: the initramfs marker {uptime:.2f} s after boot "
        f"(kernel's clock), {wall:.1f} s of wall time for the whole run, "
        f"{exits.group(1) if exits else '?'} exits, {dma.group(1)} fw_cfg DMA accesses"
    )


@pytest.mark.parametrize("path", PATHS)
def test_edu_assigned_through_the_firmware(path: str) -> None:
    """The firmware path with a device: the guest still finds, maps and drives edu."""
    edu = rig_env("PYVMM_RIG_EDU")
    done = run_guest("edu", edu, path, "--firmware", "--stats")
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("edu: id 0x010000ed", "intx 3 ok", "msi 3 ok", "edu: all ok"):
        assert line in done.stdout, done.stdout
    assert re.search(r"port 0x514 fw_cfg-dma: \d+ accesses", done.stderr), done.stderr
