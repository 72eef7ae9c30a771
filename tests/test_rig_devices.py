"""Host-device discovery on the rig's real sysfs: `pyvmm devices --json`, the checks the
assignment code calls, and a bind/unbind round trip on a device that is safe to move.

The devices come from the rig's environment: PYVMM_RIG_EDU (edu on vfio-pci), PYVMM_RIG_MTTY and
PYVMM_RIG_MTTY_KVM (mdevs); where the rig has them, PYVMM_RIG_NVME (an NVMe controller),
PYVMM_RIG_NONVIABLE (on vfio-pci, in a group with a member on another driver) and
PYVMM_RIG_UNBOUND (on a host driver). A test whose device is absent is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.errors import DeviceNotBoundError, GroupNotViableError
from pyvmm.hostdev import (
    bind,
    cdev_node,
    check_bound,
    check_viable,
    find_device,
    group_members,
    unbind,
)

pytestmark = pytest.mark.rig

REPO = Path(__file__).resolve().parent.parent


def rig_device(var: str) -> str:
    """The device the rig names in var; skip the test when this rig has none."""
    name = os.environ.get(var)
    if not name:
        pytest.skip(f"{var} is not set: this rig has no such device")
    return name


def hostcli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm.hostcli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def listed() -> dict[str, dict]:
    """`pyvmm devices --json`, by device name."""
    result = hostcli("devices", "--json")
    assert result.returncode == 0, result.stderr
    return {entry["name"]: entry for entry in json.loads(result.stdout)}


def assert_assignable(entry: dict) -> None:
    assert entry["assignable"] is True, entry
    assert entry["viable"] is True and entry["fix"] is None and entry["reason"] is None, entry
    group = Path("/sys/bus") / ("mdev" if entry["is_mdev"] else "pci") / "devices" / entry["name"]
    assert entry["iommu_group"] == int(os.readlink(group / "iommu_group").rsplit("/", 1)[1])
    (vfio,) = os.listdir(group / "vfio-dev")
    assert entry["cdev"] == f"/dev/vfio/devices/{vfio}", entry


def test_edu_is_assignable(listed: dict[str, dict]) -> None:
    edu = listed[os.environ["PYVMM_RIG_EDU"]]
    assert_assignable(edu)
    assert (edu["vendor"], edu["device"], edu["driver"]) == (0x1234, 0x11E8, "vfio-pci")
    assert edu["description"] == "1234:11e8 class 00ff00" and not edu["is_mdev"]
    device = find_device(edu["name"])
    check_bound(device)
    check_viable(device)
    assert [m.name for m in group_members(device)] == [device.name]
    assert str(cdev_node(device)) == edu["cdev"]
    assert device.group_node.is_char_device()


@pytest.mark.parametrize(
    ("var", "kind"), [("PYVMM_RIG_MTTY", "mtty"), ("PYVMM_RIG_MTTY_KVM", "mtty_kvm")]
)
def test_mdevs_are_assignable(listed: dict[str, dict], var: str, kind: str) -> None:
    uuid = os.environ[var]
    mdev = listed[uuid]
    assert_assignable(mdev)
    # No vfio_mdev since 5.16: the mdev is bound to its parent's own mdev driver.
    assert mdev["is_mdev"] and mdev["driver"] == kind
    assert (mdev["mdev_type"], mdev["parent"]) == (f"{kind}-1", kind)
    assert mdev["vendor"] is None and mdev["description"].startswith(f"mdev {kind}-1")
    device = find_device(f"/sys/bus/mdev/devices/{uuid}")
    assert device == find_device(uuid.upper())
    check_bound(device)
    check_viable(device)
    assert str(cdev_node(device)) == mdev["cdev"]


def test_every_pci_device_and_mdev_is_listed(listed: dict[str, dict]) -> None:
    names = sorted(os.listdir("/sys/bus/pci/devices")) + sorted(os.listdir("/sys/bus/mdev/devices"))
    assert list(listed) == names
    for entry in listed.values():
        assert entry["assignable"] or entry["reason"], entry


def test_nvme(listed: dict[str, dict]) -> None:
    nvme = listed[rig_device("PYVMM_RIG_NVME")]
    assert nvme["description"].endswith("class 010802"), nvme  # NVM Express
    assert nvme["driver"] == "vfio-pci", "the rig binds the MSI-X device to vfio-pci"
    assert_assignable(nvme)


def test_nonviable_group(listed: dict[str, dict]) -> None:
    name = rig_device("PYVMM_RIG_NONVIABLE")
    entry = listed[name]
    assert entry["driver"] == "vfio-pci" and entry["viable"] is False, entry
    assert entry["assignable"] is False
    device = find_device(name)
    dma_safe = ("vfio-pci", "pci-stub", "pcieport", None)
    others = [m for m in group_members(device) if m.driver not in dma_safe]
    assert others, "the group has no member on a host driver"
    fixes = [(f"pyvmm bind {m.name}", f"echo {m.name} > ") for m in others]
    assert any(entry["fix"] == cmd or entry["fix"].startswith(echo) for cmd, echo in fixes)
    with pytest.raises(GroupNotViableError) as error:
        check_viable(device)
    assert any(
        f"{m.name} is bound to the host driver {m.driver}" in error.value.message for m in others
    )


def test_unbound(listed: dict[str, dict]) -> None:
    name = rig_device("PYVMM_RIG_UNBOUND")
    entry = listed[name]
    assert entry["driver"] != "vfio-pci" and entry["assignable"] is False, entry
    assert entry["fix"] == f"pyvmm bind {name}" and entry["cdev"] is None
    with pytest.raises(DeviceNotBoundError, match=f"`pyvmm bind {name}`"):
        check_bound(find_device(name))


def test_bind_unbind_round_trip() -> None:
    name = rig_device("PYVMM_RIG_UNBOUND")
    before = find_device(name)
    assert before.driver != "vfio-pci"
    try:
        result = hostcli("bind", name)
        assert result.returncode == 0, result.stderr
        bound = find_device(name)
        assert bound.driver == "vfio-pci"
        assert f": driver vfio-pci, IOMMU group {bound.iommu_group}" in result.stdout
        check_bound(bound)
        assert cdev_node(bound) is not None
        assert (bound.sysfs_path / "driver_override").read_text().strip() == "vfio-pci"
        # The fix `pyvmm devices` gives for the non-viable group works, where it is this bind.
        nonviable = os.environ.get("PYVMM_RIG_NONVIABLE")
        if nonviable and name in (m.name for m in group_members(find_device(nonviable))):
            check_viable(find_device(nonviable))
    finally:
        result = hostcli("unbind", name)
    assert result.returncode == 0, result.stderr
    after = find_device(name)
    assert after.driver == before.driver, result.stdout
    assert (after.sysfs_path / "driver_override").read_text().strip() == "(null)"
    assert after.name in result.stdout and "not assignable" in result.stdout


def test_in_process_round_trip_is_idempotent() -> None:
    name = rig_device("PYVMM_RIG_UNBOUND")
    before = find_device(name).driver
    try:
        assert bind(name).driver == "vfio-pci"
        assert bind(name).driver == "vfio-pci"  # already there: nothing written
    finally:
        assert unbind(name).driver == before
    assert unbind(name).driver == before  # on a host driver: left alone
