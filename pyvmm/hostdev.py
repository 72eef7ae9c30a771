"""Host-side discovery of devices for VFIO assignment: sysfs only, no ioctls.

A device is named by a PCI address (``0000:00:02.0``, or ``00:02.0`` for domain 0000), a sysfs
device path (``/sys/bus/pci/devices/...``, ``/sys/devices/...``, ``/sys/bus/mdev/devices/UUID``)
or an mdev UUID. Every function takes the sysfs and /dev roots as parameters so that the tests
can run it on a fake tree; a real path under ``/sys`` given with another root is mapped into it.

What the rig's 6.12 kernel shows: a PCI device has ``vendor``, ``device``, ``class`` ("0x..."),
``driver -> .../bus/pci/drivers/NAME``, ``iommu_group -> .../kernel/iommu_groups/N`` and
``driver_override`` ("(null)" when unset). An mdev's directory sits under its parent's
(``/sys/devices/virtual/mtty/mtty/UUID``), with ``mdev_type -> ../mdev_supported_types/mtty-1``
and no IDs; it is bound to its parent's own mdev driver (``mtty``: the generic ``vfio_mdev`` of
old kernels is gone), and its IOMMU group is an emulated one, its alone, that VFIO creates when
that driver registers it: an unbound mdev has no ``iommu_group`` link. A device registered with
VFIO has ``vfio-dev/vfioN/dev`` = "MAJ:MIN" of ``/dev/vfio/devices/vfioN`` (with
CONFIG_VFIO_DEVICE_CDEV); its group node is ``/dev/vfio/N``.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from pyvmm.errors import (
    DeviceAssignmentError,
    DeviceNotBoundError,
    DeviceNotFoundError,
    DevicePermissionError,
    GroupNotViableError,
    VfioUnavailableError,
)

SYSFS = Path("/sys")
DEV = Path("/dev")

_PCI_ADDRESS = re.compile(r"(?:([0-9a-f]{4,8}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: No driver, or one that sets driver_managed_dma besides the VFIO ones: such a member claims
#: no DMA ownership of its group, which stays viable (see check_viable).
DMA_SAFE_DRIVERS = frozenset({None, "pci-stub", "pcieport"})

#: PCI base classes 06/04 (PCI-to-PCI bridge) and 06/07 (CardBus bridge): header types 1 and 2,
#: which vfio-pci refuses to probe.
_BRIDGE_CLASSES = (0x0604, 0x0607)

_LIST_HINT = "list devices with `pyvmm devices`"
_NO_IOMMU = "no IOMMU group: the IOMMU is off (boot with intel_iommu=on iommu=pt, or amd_iommu=on)"


@dataclass(frozen=True)
class HostDevice:
    """A host PCI device or mdev as sysfs shows it now (a snapshot: re-read after changes)."""

    name: str
    sysfs_path: Path
    is_mdev: bool
    vendor: int | None
    device: int | None
    driver: str | None
    iommu_group: int | None
    mdev_type: str | None
    parent: str | None
    #: the /dev root the group and cdev nodes live under (not part of the device's identity)
    dev_root: Path = field(default=DEV, compare=False, repr=False)

    @property
    def group_node(self) -> Path:
        """The VFIO group node, dev/vfio/N; VfioUnavailableError when there is no IOMMU group."""
        if self.iommu_group is None:
            raise VfioUnavailableError(f"{self.name} has {_NO_IOMMU}")
        return self.dev_root / "vfio" / str(self.iommu_group)


@dataclass
class DeviceReport:
    """One line of `pyvmm devices`: a device, its state and what would make it assignable."""

    device: HostDevice
    description: str  #: "1234:11e8 class 00ff00", or "mdev mtty-1 on mtty"
    viable: bool | None  #: None when the device has no IOMMU group
    cdev: Path | None  #: the checked VFIO device cdev, if the device has one
    assignable: bool
    fix: str | None  #: the command that makes it assignable; None when assignable (or none is)
    reason: str | None  #: why it is not assignable; None when it is

    def to_json(self) -> dict[str, object]:
        """The report as plain JSON-able values (the `pyvmm devices --json` element): the
        device's fields (vendor and device as numbers), then the report's."""
        state = {f.name: getattr(self.device, f.name) for f in fields(HostDevice) if f.compare}
        state |= {f.name: getattr(self, f.name) for f in fields(self) if f.name != "device"}
        return {key: str(v) if isinstance(v, Path) else v for key, v in state.items()}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_hex(path: Path) -> int | None:
    text = _read(path) or ""
    return int(text, 16) if re.fullmatch(r"0x[0-9a-fA-F]+", text) else None


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _is_vfio_driver(driver: str | None) -> bool:
    # vfio-pci, and its variant drivers: mlx5_vfio_pci, hisi_acc_vfio_pci, xe-vfio-pci... do
    # not start with "vfio", but all carry it in their name.
    return driver is not None and "vfio" in driver


def _device_at(path: Path, dev: Path) -> HostDevice:
    """The HostDevice for a resolved device directory."""
    group = _link_name(path / "iommu_group")
    is_mdev = _link_name(path / "subsystem") == "mdev" or (path / "mdev_type").is_symlink()
    return HostDevice(
        name=path.name,
        sysfs_path=path,
        is_mdev=is_mdev,
        vendor=None if is_mdev else _read_hex(path / "vendor"),
        device=None if is_mdev else _read_hex(path / "device"),
        driver=_link_name(path / "driver"),
        iommu_group=int(group) if group and group.isdigit() else None,
        mdev_type=_link_name(path / "mdev_type") if is_mdev else None,
        parent=path.parent.name if is_mdev else None,
        dev_root=dev,
    )


def _spec_path(spec: str, sysfs: Path) -> Path | None:
    """Where a spec points in the sysfs tree, or None when it is not a form we know."""
    text = spec.strip()
    if "/" in text:
        path = Path(text)
        if not path.is_absolute():
            return None
        for root in (sysfs, SYSFS):
            if path.is_relative_to(root):
                return sysfs / path.relative_to(root)
        return None
    text = text.lower()  # sysfs names are lower case; accept 0000:00:1F.0 and upper-case UUIDs
    if match := _PCI_ADDRESS.fullmatch(text):
        domain, bus, slot, function = match.groups()
        return sysfs / "bus/pci/devices" / f"{domain or '0000'}:{bus}:{slot}.{function}"
    if _UUID.fullmatch(text):
        return sysfs / "bus/mdev/devices" / text
    return None


def find_device(spec: str, sysfs: Path = SYSFS, dev: Path = DEV) -> HostDevice:
    """The PCI device or mdev that spec names; DeviceNotFoundError when there is none."""
    path = _spec_path(spec, sysfs)
    if path is None:
        raise DeviceNotFoundError(
            f"'{spec}' is not a PCI address (0000:00:02.0 or 00:02.0), a sysfs device path or an"
            f" mdev UUID: {_LIST_HINT}"
        )
    if path.exists():
        real = path.resolve()
        # Only a device of the pci or mdev bus: not a driver, a group or another sysfs directory.
        for bus in ("pci", "mdev"):
            entry = sysfs / "bus" / bus / "devices" / real.name
            if entry.exists() and entry.resolve() == real:
                return _device_at(real, dev)
    raise DeviceNotFoundError(
        f"no PCI device or mdev '{spec}' on this host (looked for {path}): {_LIST_HINT}"
    )


def group_members(device: HostDevice, sysfs: Path = SYSFS) -> list[HostDevice]:
    """Every device in device's IOMMU group, itself included, by name; [] without a group."""
    if device.iommu_group is None:
        return []
    members = sysfs / "kernel/iommu_groups" / str(device.iommu_group) / "devices"
    entries = sorted(members.iterdir()) if members.is_dir() else []
    return [_device_at(entry.resolve(), device.dev_root) for entry in entries] or [device]


def _pci_class(device: HostDevice) -> int:
    cls = None if device.is_mdev else _read_hex(device.sysfs_path / "class")
    return -1 if cls is None else cls


def _is_bridge(device: HostDevice) -> bool:
    return _pci_class(device) >> 8 in _BRIDGE_CLASSES


def _sysfs_root(device: HostDevice) -> Path:
    # The sysfs root above a device directory: the parent of its "devices" ancestor.
    for ancestor in device.sysfs_path.parents:
        if ancestor.name == "devices" and (ancestor.parent / "bus").is_dir():
            return ancestor.parent
    return SYSFS


#: PCI base classes whose devices a host usually depends on while a driver holds them.
_HOST_CLASSES = {0x01: "storage", 0x02: "network", 0x03: "display", 0x0C: "serial bus (USB)"}


class _Problem(NamedTuple):
    """What stands between a device and assignment: reason, fix command (if any), and a hint."""

    reason: str
    fix: str | None
    hint: str = ""

    @property
    def message(self) -> str:
        return f"{self.reason}: run `{self.fix}`{self.hint}" if self.fix else self.reason


def _viability_problem(device: HostDevice, sysfs: Path) -> _Problem | None:
    """The first group member that makes the group not viable, and how to release it."""
    for member in group_members(device, sysfs):
        # mdevs sit alone in their emulated group, and the mdev bus claims no DMA ownership.
        if member.is_mdev or member.driver in DMA_SAFE_DRIVERS or _is_vfio_driver(member.driver):
            continue
        where = sysfs / "bus/pci/devices" / member.name
        where = where if where.exists() else member.sysfs_path
        unbind = f"echo {member.name} > {where}/driver/unbind"
        reason = (
            f"IOMMU group {device.iommu_group} of {device.name} is not viable:"
            f" {member.name} is bound to the host driver {member.driver}"
        )
        if _is_bridge(member):  # vfio-pci will not take a bridge: release it from its driver
            return _Problem(reason, unbind)
        return _Problem(reason, f"pyvmm bind {member.name}", f" (or release it: `{unbind}`)")
    return None


def check_viable(device: HostDevice, sysfs: Path = SYSFS) -> None:
    """Raise GroupNotViableError unless the device's IOMMU group may be given to userspace.

    The rule is the kernel's since Linux 5.19, where VFIO_GROUP_GET_STATUS reports the group
    viable when ``iommu_group_dma_owner_claimed()`` is false: no member is bound to a driver
    that uses the kernel DMA API. Drivers that set ``driver_managed_dma`` don't count: the
    VFIO drivers (vfio-pci and its variants), pci-stub and pcieport; neither does an unbound
    device. So a member passes when it is unbound, on a driver whose name contains "vfio", on
    pci-stub or pcieport, or is an mdev. The device itself counts too. The pre-5.19
    exemption of every non-normal-header device (a bridge on any driver, e.g. shpchp) is gone,
    and not applied here. Raises VfioUnavailableError when the device has no IOMMU group.
    """
    if device.iommu_group is None:
        raise VfioUnavailableError(f"{device.name} has {_NO_IOMMU}")
    if problem := _viability_problem(device, sysfs):
        raise GroupNotViableError(problem.message)


def _bound_problem(device: HostDevice) -> _Problem | None:
    """Why the device is not in VFIO's hands, if it is not."""
    if not device.is_mdev:
        if _is_vfio_driver(device.driver):
            return None
        now = f"bound to {device.driver}" if device.driver else "not bound to any driver"
        reason = f"{device.name} is {now}, not vfio-pci"
        kind = _HOST_CLASSES.get(_pci_class(device) >> 16)
        if device.driver and kind:
            # The fix takes the device away from the host: say so before someone pastes it.
            reason += f" (careful: the host may be using this {kind} device through it)"
        return _Problem(reason, f"pyvmm bind {device.name}")
    if device.driver is None:
        drivers = _sysfs_root(device) / "bus/mdev/drivers"
        names = sorted(p.name for p in drivers.iterdir()) if drivers.is_dir() else []
        fix = f"echo {device.name} > {drivers}/{names[0] if len(names) == 1 else 'DRIVER'}/bind"
        hint = f" (DRIVER: one of {', '.join(names)})" if len(names) > 1 else ""
        return _Problem(f"mdev {device.name} has no driver", fix, hint)
    if device.iommu_group is None and not (device.sysfs_path / "vfio-dev").is_dir():
        reason = f"mdev {device.name} is bound to {device.driver}, which did not register it"
        return _Problem(reason + " with VFIO (no IOMMU group, no vfio-dev)", None)
    return None


def check_iommu(device: HostDevice) -> None:
    """Raise the error `pyvmm devices` reports first when no VFIO path can take the device at all.

    A PCI device without an IOMMU group means the host's IOMMU is off: binding it to vfio-pci
    would not help, so this comes before check_bound. A bridge is never taken by vfio-pci.
    """
    if _is_bridge(device):
        raise DeviceNotBoundError(
            f"{device.name} is a PCI bridge: vfio-pci does not take bridges (assign the devices"
            " behind it)"
        )
    if not device.is_mdev and device.iommu_group is None:
        raise VfioUnavailableError(f"{device.name} has {_NO_IOMMU}")


def check_bound(device: HostDevice) -> None:
    """Raise DeviceNotBoundError unless the device is in VFIO's hands.

    A PCI device must be bound to vfio-pci or a variant driver (a name containing "vfio", as
    mlx5_vfio_pci or xe-vfio-pci). An mdev must be bound to a driver that registered it with
    VFIO, so that it has an IOMMU group or a vfio-dev directory: on current kernels its
    parent's own mdev driver ("mtty" for the kernel sample), on old ones "vfio_mdev".
    """
    if problem := _bound_problem(device):
        raise DeviceNotBoundError(problem.message)


def _char_device(path: Path) -> str:
    """ "MAJ:MIN" of a character device node; "missing" or "not a character device" if not."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISCHR(st.st_mode):
        return "not a character device"
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def cdev_node(device: HostDevice, sysfs: Path = SYSFS, dev: Path = DEV) -> Path | None:
    """The device's VFIO cdev, dev/vfio/devices/vfioN, checked against sysfs; None if none.

    Raises DeviceAssignmentError when the node is missing, or is not the character device
    whose major:minor sysfs gives in vfio-dev/vfioN/dev.
    """
    vfio_dev = device.sysfs_path / "vfio-dev"
    entries = sorted(vfio_dev.glob("vfio*")) if vfio_dev.is_dir() else []
    if not entries:
        return None
    sys_dev, node = entries[0] / "dev", dev / "vfio/devices" / entries[0].name
    want = _read(sys_dev) or ""
    if not re.fullmatch(r"\d+:\d+", want):
        raise DeviceAssignmentError(f"{sys_dev} does not hold a MAJ:MIN device number: {want!r}")
    mknod = f"`mknod {node} c {want.replace(':', ' ')}`"
    have = _char_device(node)
    if have == "missing":
        raise DeviceAssignmentError(f"{node} is missing ({sys_dev} says {want}): run {mknod}")
    if have != want:
        raise DeviceAssignmentError(
            f"{node} is {have} but {sys_dev} says {want}: recreate it with `rm {node}` and {mknod}"
        )
    return node


def _describe(device: HostDevice) -> str:
    if device.is_mdev:
        kind = _read(device.sysfs_path / "mdev_type" / "name")
        detail = f" ({kind})" if kind else ""
        return f"mdev {device.mdev_type}{detail} on {device.parent}"
    ids = f"{device.vendor or 0:04x}:{device.device or 0:04x}"
    cls = _pci_class(device)
    return ids if cls < 0 else f"{ids} class {cls:06x}"


def report(device: HostDevice, sysfs: Path = SYSFS, dev: Path = DEV) -> DeviceReport:
    """What `pyvmm devices` says about one device: its state and the fix if not assignable."""
    has_group = device.iommu_group is not None
    viable = _viability_problem(device, sysfs) is None if has_group else None
    try:
        cdev, cdev_problem = cdev_node(device, sysfs, dev), None
    except DeviceAssignmentError as error:
        cdev, cdev_problem = None, error.message
    found = DeviceReport(device, _describe(device), viable, cdev, False, None, None)
    # The first obstacle, in the order they must be removed.
    if _is_bridge(device):
        found.reason = "a PCI bridge: vfio-pci does not take bridges (assign the devices behind it)"
    elif not device.is_mdev and not has_group:
        found.reason = _NO_IOMMU
    elif problem := _bound_problem(device) or _viability_problem(device, sysfs):
        found.reason, found.fix = problem.reason, problem.fix
    elif cdev is None and not (has_group and ":" in _char_device(device.group_node)):
        found.reason = cdev_problem or "no VFIO group node and no VFIO device cdev"
    else:
        found.assignable = True
    return found


def list_devices(sysfs: Path = SYSFS, dev: Path = DEV) -> list[DeviceReport]:
    """Reports on every PCI device, then every mdev, of the host, each sorted by name."""
    buses = [sysfs / "bus" / bus / "devices" for bus in ("pci", "mdev")]
    entries = [entry for bus in buses if bus.is_dir() for entry in sorted(bus.iterdir())]
    return [report(_device_at(entry.resolve(), dev), sysfs, dev) for entry in entries]


def _write(path: Path, text: str) -> None:
    """Write to a sysfs attribute in one write(2), as the kernel expects."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except PermissionError:
        denied = f"cannot write {path}: permission denied: run as root"
        raise DevicePermissionError(denied) from None
    except OSError as error:
        what = text.strip() or "a newline"
        raise DeviceAssignmentError(f"writing {what} to {path} failed: {error.strerror}") from None


def _pci_only(spec: str, sysfs: Path, verb: str) -> HostDevice:
    device = find_device(spec, sysfs)
    if device.is_mdev:
        raise DeviceAssignmentError(
            f"{device.name} is an mdev: its parent's mdev driver ({device.driver or 'none'})"
            f" binds it, not `pyvmm {verb}`, which moves PCI devices"
        )
    return device


def bind(spec: str, sysfs: Path = SYSFS) -> HostDevice:
    """Move a PCI device to vfio-pci and return its new state.

    Writes "vfio-pci" to driver_override (so no other driver takes it), the name to
    driver/unbind if a driver holds it, then the name to /sys/bus/pci/drivers_probe. A device
    already on a VFIO driver is left as it is. If it does not end up on vfio-pci, it is given
    back to the host (override cleared, probed again) and DeviceNotBoundError says why.
    """
    device = _pci_only(spec, sysfs, "bind")
    if _is_vfio_driver(device.driver):
        return device
    if _is_bridge(device):
        raise DeviceAssignmentError(
            f"{device.name} is a PCI bridge: vfio-pci does not take bridges; assign the devices"
            " behind it"
        )
    name, path = device.name, device.sysfs_path
    if not (sysfs / "bus/pci/drivers/vfio-pci").is_dir():
        raise DeviceNotBoundError(
            f"cannot bind {name}: the vfio-pci driver is not loaded: run `modprobe vfio-pci`,"
            f" then `pyvmm bind {name}`"
        )
    _write(path / "driver_override", "vfio-pci")
    if device.driver:
        _write(path / "driver" / "unbind", name)
    _write(sysfs / "bus/pci/drivers_probe", name)
    after = find_device(name, sysfs)
    if after.driver == "vfio-pci":
        return after
    try:  # give it back rather than leave it driverless
        _write(path / "driver_override", "\n")
        _write(sysfs / "bus/pci/drivers_probe", name)
    except DeviceAssignmentError:
        pass
    raise DeviceNotBoundError(
        f"{name} did not bind to vfio-pci (driver now: {after.driver or 'none'}; see dmesg):"
        f" check `modprobe vfio-pci` and that the IOMMU is on, then `pyvmm bind {name}`"
    )


def unbind(spec: str, sysfs: Path = SYSFS) -> HostDevice:
    """Release a PCI device from vfio-pci to the host and return its new state.

    Writes the name to driver/unbind (this blocks while a process holds the device open),
    clears driver_override (a newline), then writes the name to drivers_probe so the host
    driver can take it back. A device on a non-VFIO driver is left alone.
    """
    device = _pci_only(spec, sysfs, "unbind")
    if device.driver and not _is_vfio_driver(device.driver):
        return device
    if device.driver:
        _write(device.sysfs_path / "driver/unbind", device.name)
    _write(device.sysfs_path / "driver_override", "\n")
    _write(sysfs / "bus/pci/drivers_probe", device.name)
    return find_device(device.name, sysfs)
