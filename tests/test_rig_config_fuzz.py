"""A guest that writes random values to every config-space register of an assigned device.

Whatever a guest writes to configuration space (BARs onto RAM or platform devices, MSI with
more vectors than the device has, MSI-X enables, D3hot, the capability list, the ROM BAR),
the guest may misbehave but pyvmm may not die: the run ends with the guest's own status,
what pyvmm refused is a one-line warning each, and the device works in the next run. On
both VFIO paths, for edu and the NVMe controller, a few seeds each.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from pyvmm import guest_path
from tests.test_rig_assign import PATHS, rig_env, run_guest

pytestmark = pytest.mark.rig
SEEDS = [1, 0xC0FFEE]
#: guest_exit(42): the fuzz guest's "done" (guests/cfg_fuzz.c).
FUZZ_DONE_STATUS = 42 << 1 | 1
SEED_MARKER = b"cfg_fuzz seed:\0\0"
#: What the normal guest of each device prints when it passes.
DEVICES = {
    "PYVMM_RIG_EDU": ("edu", "edu: all ok"),
    "PYVMM_RIG_NVME": ("nvme_msix", "nvme: all ok"),
}


def fuzz_image(seed: int, directory: Path) -> Path:
    """A copy of the cfg_fuzz guest that runs with seed (written after its marker)."""
    image = bytearray(guest_path("cfg_fuzz").read_bytes())
    at = image.find(SEED_MARKER)
    assert at >= 0 and image.find(SEED_MARKER, at + 1) < 0, "one seed marker in the image"
    image[at + len(SEED_MARKER) : at + len(SEED_MARKER) + 8] = struct.pack("<Q", seed)
    path = directory / f"cfg_fuzz_{seed:x}.elf"
    path.write_bytes(image)
    return path


def pyvmm_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pyvmm: warning: ")]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variable", list(DEVICES))
def test_config_space_fuzz_leaves_pyvmm_and_the_device_working(
    variable: str, path: str, seed: int, tmp_path: Path
) -> None:
    device = rig_env(variable)
    guest, passed = DEVICES[variable]
    fuzzed = run_guest(str(fuzz_image(seed, tmp_path)), device, path)
    report = fuzzed.stdout + fuzzed.stderr
    print(report)  # the counts and warnings, for the record (-s)
    assert fuzzed.returncode == FUZZ_DONE_STATUS, report
    assert re.search(rf"cfg_fuzz: seed {seed}: \d+ config writes", fuzzed.stdout), report
    for line in fuzzed.stderr.splitlines():
        assert line.startswith(("pyvmm: warning: ", "trace: ")), f"not a warning: {line!r}"
        assert "Traceback" not in line
    after = run_guest(guest, device, path)
    assert after.returncode == 0, after.stdout + after.stderr
    assert passed in after.stdout, after.stdout
    refusals = [w for w in pyvmm_warnings(after.stderr) if "refused" in w or "failed" in w]
    assert not refusals, after.stderr
