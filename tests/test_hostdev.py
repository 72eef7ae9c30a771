"""pyvmm.hostdev and the devices/bind/unbind commands on a fake sysfs and /dev, laid out as the
kernel lays them out (relative symlinks, real character device nodes: the tests run as root)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pyvmm import hostcli, hostdev
from pyvmm.errors import (
    DeviceAssignmentError,
    DeviceNotBoundError,
    DeviceNotFoundError,
    DevicePermissionError,
    ExitStatus,
    GroupNotViableError,
    VfioUnavailableError,
)
from pyvmm.hostdev import (
    bind,
    cdev_node,
    check_bound,
    check_viable,
    find_device,
    group_members,
    list_devices,
    unbind,
)

EDU = "0000:00:02.0"
MTTY = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
VFIO_MAJOR = 244


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


class FakeHost:
    """A sysfs tree and a /dev under tmp_path, with helpers to add what the kernel would."""

    def __init__(self, root: Path) -> None:
        self.sysfs = root / "sys"
        self.dev = root / "dev"
        for d in ("bus/pci/devices", "bus/pci/drivers", "bus/mdev/devices", "kernel/iommu_groups"):
            (self.sysfs / d).mkdir(parents=True)
        (self.sysfs / "bus/pci/drivers_probe").touch()
        (self.dev / "vfio/devices").mkdir(parents=True)
        self.minor = 0

    def driver(self, bus: str, name: str) -> Path:
        d = self.sysfs / "bus" / bus / "drivers" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind"):
            (d / f).touch()
        return d

    def set_driver(self, path: Path, bus: str, driver: str | None) -> None:
        """Bind (or unbind, with None) as the kernel shows it: the driver link."""
        (path / "driver").unlink(missing_ok=True)
        if driver:
            self.driver(bus, driver)
            depth = len(path.relative_to(self.sysfs).parts)
            link(path / "driver", "../" * depth + f"bus/{bus}/drivers/{driver}")

    def join_group(self, path: Path, group: int) -> None:
        depth = len(path.relative_to(self.sysfs).parts)
        link(path / "iommu_group", "../" * depth + f"kernel/iommu_groups/{group}")
        rel = path.relative_to(self.sysfs)
        link(self.sysfs / f"kernel/iommu_groups/{group}/devices/{path.name}", f"../../../../{rel}")

    def add_pci(
        self,
        bdf: str,
        ids: tuple[int, int] = (0x1234, 0x11E8),
        cls: int = 0x00FF00,
        driver: str | None = "vfio-pci",
        group: int | None = 2,
        cdev: bool = True,
    ) -> Path:
        path = self.sysfs / "devices/pci0000:00" / bdf
        path.mkdir(parents=True)
        (path / "vendor").write_text(f"0x{ids[0]:04x}\n")
        (path / "device").write_text(f"0x{ids[1]:04x}\n")
        (path / "class").write_text(f"0x{cls:06x}\n")
        (path / "driver_override").write_text("(null)\n")
        link(path / "subsystem", "../../../bus/pci")
        link(self.sysfs / "bus/pci/devices" / bdf, f"../../../devices/pci0000:00/{bdf}")
        self.set_driver(path, "pci", driver)
        if group is not None:
            self.join_group(path, group)
            self.group_node(group)
        if cdev:
            self.add_cdev(path)
        return path

    def add_mdev(
        self, uuid: str = MTTY, driver: str | None = "mtty", group: int | None = 7
    ) -> Path:
        parent = self.sysfs / "devices/virtual/mtty/mtty"
        (parent / "mdev_supported_types/mtty-1").mkdir(parents=True, exist_ok=True)
        (parent / "mdev_supported_types/mtty-1/name").write_text("Single port serial\n")
        path = parent / uuid
        path.mkdir()
        link(path / "mdev_type", "../mdev_supported_types/mtty-1")
        link(path / "subsystem", "../../../../../bus/mdev")
        link(self.sysfs / "bus/mdev/devices" / uuid, f"../../../devices/virtual/mtty/mtty/{uuid}")
        self.set_driver(path, "mdev", driver)
        if group is not None:
            self.join_group(path, group)
            self.group_node(group)
            self.add_cdev(path)
        return path

    def group_node(self, group: int) -> None:
        node = self.dev / "vfio" / str(group)
        if not node.exists():
            os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(245, group))

    def add_cdev(self, path: Path, node_minor: int | None = None) -> Path:
        """vfio-dev/vfioN/dev in sysfs and /dev/vfio/devices/vfioN (node_minor: a wrong one)."""
        n = self.minor
        self.minor += 1
        entry = path / "vfio-dev" / f"vfio{n}"
        entry.mkdir(parents=True)
        (entry / "dev").write_text(f"{VFIO_MAJOR}:{n}\n")
        node = self.dev / "vfio/devices" / f"vfio{n}"
        minor = n if node_minor is None else node_minor
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(VFIO_MAJOR, minor))
        return node


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


@pytest.fixture
def rig_like(host: FakeHost) -> FakeHost:
    """The rig's layout: edu on vfio-pci, a virtio NIC, an mtty mdev."""
    host.add_pci(EDU)
    host.add_pci("0000:00:03.0", (0x1AF4, 0x1000), 0x020000, "virtio-pci", 3, cdev=False)
    host.add_mdev()
    host.driver("pci", "vfio-pci")
    return host


# --- finding devices -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        EDU,
        "00:02.0",
        "0000:00:02.0 ",
        "/sys/bus/pci/devices/0000:00:02.0",
        "/sys/devices/pci0000:00/0000:00:02.0/",
        "{sysfs}/bus/pci/devices/0000:00:02.0",
    ],
)
def test_every_pci_spec_form_finds_the_same_device(rig_like: FakeHost, spec: str) -> None:
    device = find_device(spec.format(sysfs=rig_like.sysfs), rig_like.sysfs, rig_like.dev)
    assert device.name == EDU
    assert device.sysfs_path == (rig_like.sysfs / "devices/pci0000:00" / EDU).resolve()
    assert not device.is_mdev
    assert (device.vendor, device.device) == (0x1234, 0x11E8)
    assert device.driver == "vfio-pci"
    assert device.iommu_group == 2
    assert device.mdev_type is None and device.parent is None
    assert device.group_node == rig_like.dev / "vfio/2"


@pytest.mark.parametrize(
    "spec",
    [MTTY, MTTY.upper(), f"/sys/bus/mdev/devices/{MTTY}", f"/sys/devices/virtual/mtty/mtty/{MTTY}"],
)
def test_every_mdev_spec_form_finds_the_same_device(rig_like: FakeHost, spec: str) -> None:
    device = find_device(spec, rig_like.sysfs, rig_like.dev)
    assert device.name == MTTY
    assert device.is_mdev
    assert device.vendor is None and device.device is None
    assert (device.driver, device.iommu_group) == ("mtty", 7)
    assert (device.mdev_type, device.parent) == ("mtty-1", "mtty")


@pytest.mark.parametrize(
    "spec",
    [
        "0000:00:09.0",
        "00:09.0",
        "12345678-1234-1234-1234-123456789abc",
        "/sys/bus/pci/drivers/vfio-pci",
        "/sys/kernel/iommu_groups/2",
        "/etc/passwd",
        "edu",
        "",
    ],
)
def test_not_found_names_the_spec_and_how_to_list(rig_like: FakeHost, spec: str) -> None:
    with pytest.raises(DeviceNotFoundError) as error:
        find_device(spec, rig_like.sysfs, rig_like.dev)
    message = error.value.message
    assert f"'{spec}'" in message and "`pyvmm devices`" in message and "\n" not in message
    assert error.value.exit_status == ExitStatus.DEVICE_NOT_FOUND


# --- bound, viable ----------------------------------------------------------------------


def test_bound_devices_pass(rig_like: FakeHost) -> None:
    check_bound(find_device(EDU, rig_like.sysfs))
    check_bound(find_device(MTTY, rig_like.sysfs))


def test_variant_driver_counts_as_bound(host: FakeHost) -> None:
    host.add_pci("0000:01:00.0", driver="mlx5_vfio_pci", group=4)
    check_bound(find_device("01:00.0", host.sysfs))


@pytest.mark.parametrize("driver", ["virtio-pci", None])
def test_not_bound_gives_the_bind_command(host: FakeHost, driver: str | None) -> None:
    host.add_pci("0000:00:03.0", driver=driver, group=3, cdev=False)
    with pytest.raises(DeviceNotBoundError) as error:
        check_bound(find_device("00:03.0", host.sysfs))
    assert "`pyvmm bind 0000:00:03.0`" in error.value.message
    assert (driver or "not bound to any driver") in error.value.message


def test_unbound_mdev_gives_the_driver_bind_command(host: FakeHost) -> None:
    host.driver("mdev", "mtty")
    host.add_mdev(driver=None, group=None)
    with pytest.raises(DeviceNotBoundError) as error:
        check_bound(find_device(MTTY, host.sysfs))
    assert f"`echo {MTTY} > {host.sysfs}/bus/mdev/drivers/mtty/bind`" in error.value.message


def test_group_members(host: FakeHost) -> None:
    host.add_pci("0000:00:1f.0", cls=0x060100, driver=None, group=6, cdev=False)
    host.add_pci("0000:00:1f.2", cls=0x010601, driver="vfio-pci", group=6)
    host.add_pci("0000:00:1f.3", cls=0x0C0500, driver="i801_smbus", group=6, cdev=False)
    members = group_members(find_device("00:1f.2", host.sysfs), host.sysfs)
    assert [(m.name, m.driver) for m in members] == [
        ("0000:00:1f.0", None),
        ("0000:00:1f.2", "vfio-pci"),
        ("0000:00:1f.3", "i801_smbus"),
    ]


def test_non_viable_group_names_member_driver_and_fix(host: FakeHost) -> None:
    host.add_pci("0000:00:1f.0", cls=0x060100, driver=None, group=6, cdev=False)
    host.add_pci("0000:00:1f.2", cls=0x010601, driver="vfio-pci", group=6)
    host.add_pci("0000:00:1f.3", cls=0x0C0500, driver="i801_smbus", group=6, cdev=False)
    with pytest.raises(GroupNotViableError) as error:
        check_viable(find_device("00:1f.2", host.sysfs), host.sysfs)
    message = error.value.message
    assert "0000:00:1f.3" in message and "i801_smbus" in message and "\n" not in message
    assert "`pyvmm bind 0000:00:1f.3`" in message
    unbind_path = host.sysfs / "bus/pci/devices/0000:00:1f.3/driver/unbind"
    assert f"`echo 0000:00:1f.3 > {unbind_path}`" in message


def test_bridge_on_a_host_driver_is_released_not_bound(host: FakeHost) -> None:
    host.add_pci("0000:00:1c.0", cls=0x060400, driver="shpchp", group=5, cdev=False)
    host.add_pci("0000:01:00.0", driver="vfio-pci", group=5)
    with pytest.raises(GroupNotViableError) as error:
        check_viable(find_device("01:00.0", host.sysfs), host.sysfs)
    assert "run `echo 0000:00:1c.0 >" in error.value.message
    assert "pyvmm bind 0000:00:1c.0" not in error.value.message


@pytest.mark.parametrize("other", [None, "vfio-pci", "pci-stub", "pcieport", "hisi_acc_vfio_pci"])
def test_viable_group_with_unbound_or_dma_safe_member(host: FakeHost, other: str | None) -> None:
    host.add_pci("0000:00:1c.0", cls=0x060400, driver=other, group=5, cdev=False)
    host.add_pci("0000:01:00.0", driver="vfio-pci", group=5)
    check_viable(find_device("01:00.0", host.sysfs), host.sysfs)


def test_no_iommu_group(host: FakeHost) -> None:
    host.add_pci("0000:00:04.0", driver="virtio-pci", group=None, cdev=False)
    device = find_device("00:04.0", host.sysfs)
    assert group_members(device, host.sysfs) == []
    with pytest.raises(VfioUnavailableError, match="no IOMMU group"):
        check_viable(device, host.sysfs)
    with pytest.raises(VfioUnavailableError):
        _ = device.group_node


# --- the device cdev --------------------------------------------------------------------


def test_cdev_found(rig_like: FakeHost) -> None:
    edu = find_device(EDU, rig_like.sysfs, rig_like.dev)
    assert cdev_node(edu, rig_like.sysfs, rig_like.dev) == rig_like.dev / "vfio/devices/vfio0"
    mtty = find_device(MTTY, rig_like.sysfs, rig_like.dev)
    assert cdev_node(mtty, rig_like.sysfs, rig_like.dev) == rig_like.dev / "vfio/devices/vfio1"


def test_cdev_major_minor_mismatch(host: FakeHost) -> None:
    path = host.add_pci(EDU, cdev=False)
    host.add_cdev(path, node_minor=9)
    with pytest.raises(DeviceAssignmentError) as error:
        cdev_node(find_device(EDU, host.sysfs), host.sysfs, host.dev)
    message = error.value.message
    assert "244:9" in message and "244:0" in message and str(host.dev / "vfio/devices/vfio0")
    assert "vfio-dev/vfio0/dev" in message


def test_cdev_node_missing_or_not_a_char_device(host: FakeHost) -> None:
    path = host.add_pci(EDU, cdev=False)
    node = host.add_cdev(path)
    node.unlink()
    device = find_device(EDU, host.sysfs)
    with pytest.raises(DeviceAssignmentError, match=f"mknod {node} c 244 0"):
        cdev_node(device, host.sysfs, host.dev)
    node.write_text("")
    with pytest.raises(DeviceAssignmentError, match="not a character device"):
        cdev_node(device, host.sysfs, host.dev)


def test_no_vfio_dev_means_no_cdev(host: FakeHost) -> None:
    host.add_pci(EDU, cdev=False)
    assert cdev_node(find_device(EDU, host.sysfs), host.sysfs, host.dev) is None


# --- bind and unbind --------------------------------------------------------------------


class Kernel:
    """Records sysfs writes and does what the kernel would: unbind drops the driver link,
    drivers_probe binds the override's driver (or probe_to, when no override is set)."""

    def __init__(self, host: FakeHost, monkeypatch: pytest.MonkeyPatch, probe_to: str | None):
        self.host, self.probe_to, self.writes = host, probe_to, []
        self.real_write = hostdev._write
        monkeypatch.setattr(hostdev, "_write", self.write)

    def write(self, path: Path, text: str) -> None:
        rel = str(path.relative_to(self.host.sysfs))
        self.writes.append((rel, text))
        self.real_write(path, text)
        if rel.endswith("/unbind"):
            (self.host.sysfs / "bus/pci/devices" / text / "driver").unlink()
        elif rel.endswith("drivers_probe"):
            device = self.host.sysfs / "bus/pci/devices" / text
            override = (device / "driver_override").read_text().strip()
            driver = override if override not in ("", "(null)") else self.probe_to
            if driver and (self.host.sysfs / "bus/pci/drivers" / driver).is_dir():
                self.host.set_driver(device.resolve(), "pci", driver)


def test_bind_writes_override_unbind_probe_in_order(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.driver("pci", "vfio-pci")
    host.add_pci("0000:00:03.0", driver="virtio-pci", group=3, cdev=False)
    kernel = Kernel(host, monkeypatch, probe_to="virtio-pci")
    device = bind("00:03.0", host.sysfs)
    assert kernel.writes == [
        ("devices/pci0000:00/0000:00:03.0/driver_override", "vfio-pci"),
        ("devices/pci0000:00/0000:00:03.0/driver/unbind", "0000:00:03.0"),
        ("bus/pci/drivers_probe", "0000:00:03.0"),
    ]
    assert (host.sysfs / "bus/pci/drivers/virtio-pci/unbind").read_text() == "0000:00:03.0"
    assert device.driver == "vfio-pci"


def test_bind_unbound_device_skips_unbind(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.driver("pci", "vfio-pci")
    host.add_pci("0000:00:03.0", driver=None, group=3, cdev=False)
    kernel = Kernel(host, monkeypatch, probe_to=None)
    assert bind("00:03.0", host.sysfs).driver == "vfio-pci"
    assert [rel for rel, _ in kernel.writes] == [
        "devices/pci0000:00/0000:00:03.0/driver_override",
        "bus/pci/drivers_probe",
    ]


def test_bind_already_bound_writes_nothing(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.add_pci(EDU)
    kernel = Kernel(host, monkeypatch, probe_to=None)
    assert bind(EDU, host.sysfs).driver == "vfio-pci"
    assert kernel.writes == []


def test_bind_without_vfio_pci_loaded(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.add_pci("0000:00:03.0", driver="virtio-pci", group=3, cdev=False)
    kernel = Kernel(host, monkeypatch, probe_to="virtio-pci")
    with pytest.raises(DeviceNotBoundError, match="`modprobe vfio-pci`"):
        bind("00:03.0", host.sysfs)
    assert kernel.writes == []  # the device was left on its driver


def test_bind_that_does_not_take_gives_the_device_back(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.driver("pci", "vfio-pci")
    host.add_pci("0000:00:03.0", driver="virtio-pci", group=3, cdev=False)
    kernel = Kernel(host, monkeypatch, probe_to="virtio-pci")
    real = kernel.write

    def vfio_refuses(path: Path, text: str) -> None:
        if path.name == "driver_override" and text == "vfio-pci":
            kernel.writes.append(("refused", text))
            return
        real(path, text)

    monkeypatch.setattr(hostdev, "_write", vfio_refuses)
    with pytest.raises(DeviceNotBoundError, match="did not bind to vfio-pci") as error:
        bind("00:03.0", host.sysfs)
    assert "`modprobe vfio-pci`" in error.value.message
    assert find_device("00:03.0", host.sysfs).driver == "virtio-pci"
    assert kernel.writes[-2:] == [
        ("devices/pci0000:00/0000:00:03.0/driver_override", "\n"),
        ("bus/pci/drivers_probe", "0000:00:03.0"),
    ]


def test_unbind_writes_unbind_clear_probe_in_order(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.driver("pci", "virtio-pci")
    path = host.add_pci("0000:00:03.0", driver="vfio-pci", group=3, cdev=False)
    (path / "driver_override").write_text("vfio-pci\n")
    kernel = Kernel(host, monkeypatch, probe_to="virtio-pci")
    device = unbind("0000:00:03.0", host.sysfs)
    assert kernel.writes == [
        ("devices/pci0000:00/0000:00:03.0/driver/unbind", "0000:00:03.0"),
        ("devices/pci0000:00/0000:00:03.0/driver_override", "\n"),
        ("bus/pci/drivers_probe", "0000:00:03.0"),
    ]
    assert (path / "driver_override").read_text() == "\n"
    assert device.driver == "virtio-pci"


def test_unbind_leaves_a_host_driver_alone(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.add_pci("0000:00:03.0", driver="virtio-pci", group=3, cdev=False)
    kernel = Kernel(host, monkeypatch, probe_to=None)
    assert unbind("00:03.0", host.sysfs).driver == "virtio-pci"
    assert kernel.writes == []


def test_bind_and_unbind_refuse_mdevs(rig_like: FakeHost) -> None:
    for verb in (bind, unbind):
        with pytest.raises(DeviceAssignmentError, match="is an mdev: its parent's mdev driver"):
            verb(MTTY, rig_like.sysfs)


def test_bind_refuses_a_bridge(host: FakeHost) -> None:
    host.driver("pci", "vfio-pci")
    host.add_pci("0000:00:1c.0", cls=0x060400, driver="pcieport", group=5, cdev=False)
    with pytest.raises(DeviceAssignmentError, match="PCI bridge"):
        bind("00:1c.0", host.sysfs)


def test_permission_error_says_run_as_root(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host.driver("pci", "vfio-pci")
    host.add_pci("0000:00:03.0", driver="virtio-pci", group=3, cdev=False)

    real_open = os.open

    def denied(path: Path, *args: int) -> int:
        if str(path).startswith(str(host.sysfs)):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args)

    monkeypatch.setattr(hostdev.os, "open", denied)
    with pytest.raises(DevicePermissionError, match="run as root") as error:
        bind("00:03.0", host.sysfs)
    assert "driver_override" in error.value.message


# --- list_devices and the commands ------------------------------------------------------


def test_list_devices_reports_and_fixes(rig_like: FakeHost) -> None:
    rig_like.add_pci("0000:00:1c.0", cls=0x060400, driver="pcieport", group=5, cdev=False)
    rig_like.add_pci("0000:01:00.0", driver="vfio-pci", group=5)
    rig_like.add_pci("0000:00:1f.2", cls=0x010601, driver="vfio-pci", group=6)
    rig_like.add_pci("0000:00:1f.3", cls=0x0C0500, driver="i801_smbus", group=6, cdev=False)
    rig_like.add_pci("0000:00:04.0", driver="virtio-pci", group=None, cdev=False)
    reports = {r.device.name: r for r in list_devices(rig_like.sysfs, rig_like.dev)}
    assert list(reports) == [
        "0000:00:02.0",
        "0000:00:03.0",
        "0000:00:04.0",
        "0000:00:1c.0",
        "0000:00:1f.2",
        "0000:00:1f.3",
        "0000:01:00.0",
        MTTY,
    ]
    edu = reports[EDU]
    assert edu.description == "1234:11e8 class 00ff00"
    assert (edu.viable, edu.assignable, edu.fix, edu.reason) == (True, True, None, None)
    assert edu.cdev == rig_like.dev / "vfio/devices/vfio0"
    nic = reports["0000:00:03.0"]
    assert (nic.viable, nic.cdev, nic.assignable) == (False, None, False)
    assert nic.fix == "pyvmm bind 0000:00:03.0" and "virtio-pci" in nic.reason
    assert reports["0000:00:04.0"].viable is None
    assert reports["0000:00:04.0"].fix is None and "IOMMU" in reports["0000:00:04.0"].reason
    bridge = reports["0000:00:1c.0"]
    assert not bridge.assignable and bridge.fix is None and "bridge" in bridge.reason
    assert reports["0000:01:00.0"].assignable  # behind a pcieport bridge: viable
    sata = reports["0000:00:1f.2"]
    assert (sata.viable, sata.assignable, sata.fix) == (False, False, "pyvmm bind 0000:00:1f.3")
    mtty = reports[MTTY]
    assert mtty.description == "mdev mtty-1 (Single port serial) on mtty"
    assert (mtty.viable, mtty.assignable) == (True, True)
    assert mtty.cdev == rig_like.dev / "vfio/devices/vfio1"


def test_cdev_mismatch_with_a_group_node_still_assignable(host: FakeHost) -> None:
    path = host.add_pci(EDU, cdev=False)
    host.add_cdev(path, node_minor=5)
    (found,) = list_devices(host.sysfs, host.dev)
    assert found.assignable and found.cdev is None
    (host.dev / "vfio/2").unlink()
    (found,) = list_devices(host.sysfs, host.dev)
    assert not found.assignable and "244:5" in found.reason


def cli(host: FakeHost, *args: str) -> int:
    return hostcli.main([*args, "--sysfs", str(host.sysfs), "--dev", str(host.dev)])


def test_devices_table(rig_like: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(rig_like, "devices") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == "NAME IDS/TYPE DRIVER GROUP VIABLE CDEV ASSIGNABLE".split()
    assert lines[1].split() == [EDU, "1234:11e8", "vfio-pci", "2", "yes", "vfio0", "yes"]
    # A device on a host driver makes its own group not viable, as the kernel sees it.
    assert lines[2].split() == ["0000:00:03.0", "1af4:1000", "virtio-pci", "3", "no", "-", "no"]
    assert lines[3].startswith("    fix: pyvmm bind 0000:00:03.0  # ")
    assert lines[4].split() == [MTTY, "mtty-1", "mtty", "7", "yes", "vfio1", "yes"]
    assert len(lines) == 5


def test_devices_json(rig_like: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(rig_like, "devices", "--json") == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed[EDU]["cdev"] == str(rig_like.dev / "vfio/devices/vfio0")
    assert (listed[EDU]["vendor"], listed[EDU]["device"]) == (0x1234, 0x11E8)
    assert listed["0000:00:03.0"]["fix"] == "pyvmm bind 0000:00:03.0"
    assert listed[MTTY]["mdev_type"] == "mtty-1" and listed[MTTY]["assignable"] is True


def test_bind_and_unbind_commands(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    host.driver("pci", "vfio-pci")
    host.add_pci("0000:00:03.0", (0x1AF4, 0x1000), 0x020000, "virtio-pci", 3, cdev=False)
    Kernel(host, monkeypatch, probe_to="virtio-pci")
    assert cli(host, "bind", "00:03.0") == 0
    out = capsys.readouterr().out
    assert out.startswith("0000:00:03.0 (1af4:1000 class 020000): driver vfio-pci, IOMMU group 3")
    assert out.endswith(", assignable\n") and out.count("\n") == 1
    assert cli(host, "unbind", "00:03.0") == 0
    out = capsys.readouterr().out
    assert ": driver virtio-pci, IOMMU group 3 (not viable), no cdev, not assignable: " in out


def test_cli_errors_are_one_line_with_status(
    rig_like: FakeHost, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(rig_like, "bind", "00:09.0") == ExitStatus.DEVICE_NOT_FOUND
    err = capsys.readouterr().err
    assert err.startswith("pyvmm: no PCI device or mdev '00:09.0'") and err.count("\n") == 1
    assert cli(rig_like, "unbind", MTTY) == ExitStatus.DEVICE_ERROR


def test_pyvmm_command_has_the_subcommands(
    rig_like: FakeHost, capsys: pytest.CaptureFixture[str]
) -> None:
    from pyvmm import cli as pyvmm_cli

    roots = ["--sysfs", str(rig_like.sysfs), "--dev", str(rig_like.dev)]
    assert pyvmm_cli.main(["devices", *roots]) == 0
    through_pyvmm = capsys.readouterr().out
    assert cli(rig_like, "devices") == 0
    assert capsys.readouterr().out == through_pyvmm
    assert pyvmm_cli.main(["bind", "00:09.0", *roots]) == ExitStatus.DEVICE_NOT_FOUND
    assert capsys.readouterr().err.startswith("pyvmm: no PCI device or mdev '00:09.0'")


def test_fix_warns_when_the_host_may_be_using_the_device(host: FakeHost) -> None:
    host.add_pci("0000:00:05.0", ids=(0x8086, 0x10D3), cls=0x020000, driver="e1000e", group=7)
    host.add_pci("0000:00:06.0", ids=(0x1234, 0x11E8), cls=0x00FF00, driver="edu_drv", group=8)
    nic, other = (hostdev.report(find_device(name, host.sysfs, host.dev), host.sysfs, host.dev)
                  for name in ("0000:00:05.0", "0000:00:06.0"))  # fmt: skip
    assert nic.fix == "pyvmm bind 0000:00:05.0"
    assert "careful: the host may be using this network device" in nic.reason
    assert other.fix == "pyvmm bind 0000:00:06.0" and "careful" not in other.reason


def _real_pci_device_without_iommu() -> str | None:
    root = Path("/sys/bus/pci/devices")
    if not root.is_dir() or any(Path("/sys/kernel/iommu_groups").glob("*")):
        return None
    names = sorted(p.name for p in root.iterdir())
    for name in names:
        if not hostdev._is_bridge(hostdev.find_device(name)):
            return name
    return None


@pytest.mark.usefixtures("kvm_required")
def test_run_device_on_a_host_without_iommu_says_so_as_pyvmm_devices_does(pyvmm_cli) -> None:
    """On this host (no IOMMU) `run --device` names the device and the IOMMU, not `bind`."""
    name = _real_pci_device_without_iommu()
    if name is None:
        pytest.skip("this host has IOMMU groups (or no PCI devices): not the no-IOMMU case")
    spelled = name.removeprefix("0000:")  # the short form the user may write
    listed = json.loads(pyvmm_cli("devices", "--json").stdout)
    reason = next(entry["reason"] for entry in listed if entry["name"] == name)
    result = pyvmm_cli("run", "--device", spelled, "--timeout", "30", "hello")
    lines = result.stderr.splitlines()
    assert result.returncode == ExitStatus.NO_VFIO, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"pyvmm: {spelled}: "), result.stderr
    assert reason in lines[0] and "IOMMU is off" in lines[0]
    assert "pyvmm bind" not in lines[0]
