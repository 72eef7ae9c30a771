"""Opening host devices for a VM on either VFIO path, with kvm registered before every open.

One ``VfioAssignments`` per VM owns what the devices share: the VM's KVM-VFIO device, and the
DMA context that maps guest RAM at IOVA = guest-physical address.

Group path (any kernel with VFIO):
    open /dev/vfio/vfio (container), open /dev/vfio/N, GROUP_GET_STATUS (viable?),
    KVM_DEV_VFIO_FILE_ADD(group), GROUP_SET_CONTAINER, SET_IOMMU(type1v2), IOMMU_MAP_DMA per
    RAM region, GROUP_GET_DEVICE_FD.
Cdev path (Linux 6.6+, CONFIG_VFIO_DEVICE_CDEV and CONFIG_IOMMUFD):
    open /dev/iommu, IOAS_ALLOC, IOAS_MAP per RAM region, open /dev/vfio/devices/vfioN,
    KVM_DEV_VFIO_FILE_ADD(cdev), VFIO_DEVICE_BIND_IOMMUFD, ATTACH_IOMMUFD_PT(ioas).

Teardown is the reverse, whatever ended the run. On the group path the device fd closes
before FILE_DEL. On the cdev path the cdev fd is the device: pyvmm detaches it from the IOAS
(DMA stops), then FILE_DEL drops KVM's reference to the file, and the close that follows is
what releases the device.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmm import hostdev
from pyvmm.errors import (
    ConfigurationError,
    DeviceBusyError,
    DevicePermissionError,
    GroupNotViableError,
    MemlockLimitError,
    VfioUnavailableError,
)
from pyvmm.ioctl import open_node
from pyvmm.iommufd import Iommufd
from pyvmm.kvm import Vm
from pyvmm.memory import MIB, GuestMemory
from pyvmm.vfio import (
    KvmVfioDevice,
    VfioContainer,
    VfioDevice,
    VfioDeviceCdev,
    VfioGroup,
    VfioIoctlError,
    VfioRegistration,
)

CONTAINER_PATH = "/dev/vfio/vfio"
IOMMUFD_PATH = "/dev/iommu"
CAP_IPC_LOCK = 14
VFIO_PATHS = ("auto", "cdev", "group")


def _open_or_explain(path: str, what: str) -> int:
    """Open a VFIO node, turning the usual failures into one-line errors with the fix."""
    try:
        return open_node(path)
    except FileNotFoundError:
        raise VfioUnavailableError(
            f"{path} does not exist: the kernel lacks {what} (modprobe vfio-pci"
            f"{' iommufd' if 'iommu' in path else ''}), or the device is not bound to vfio-pci"
        ) from None
    except PermissionError:
        raise DevicePermissionError(
            f"permission denied opening {path}: run as root, or give your user the node "
            f"(chown $USER {path})"
        ) from None
    except OSError as error:
        if error.errno == errno.EBUSY:
            raise DeviceBusyError(
                f"{path} is busy: another process (a VMM?) holds {what}; stop it first"
            ) from None
        raise VfioUnavailableError(f"cannot open {path}: {error.strerror}") from None


def _has_ipc_lock() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return False


def check_memlock(memory: GuestMemory) -> None:
    """Fail early, with the fix, when pinning guest RAM for DMA would exceed RLIMIT_MEMLOCK."""
    if _has_ipc_lock():
        return  # CAP_IPC_LOCK (root has it) lifts the limit for both VFIO paths
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= memory.size:
        return
    need_kib = (memory.size + 64 * MIB) // 1024
    raise MemlockLimitError(
        f"RLIMIT_MEMLOCK is {soft // 1024} KiB, but device DMA pins all {memory.size // MIB} MiB "
        f"of guest RAM: raise it to at least {need_kib} KiB (ulimit -l {need_kib}, or memlock "
        f"in /etc/security/limits.conf), or run as root"
    )


class Undo:
    """Steps that undo a set-up, run newest first; every step runs even when one raises."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []

    def push(self, step: Callable[[], None]) -> None:
        """Record how to undo the step that just succeeded."""
        self.steps.append(step)

    def run(self) -> None:
        """Undo everything recorded; then raise the first error any step raised."""
        first: BaseException | None = None
        while self.steps:
            try:
                self.steps.pop()()
            except BaseException as error:  # keep going: a later step still holds something
                first = first or error
        if first is not None:
            raise first

    def unwind(self) -> None:
        """Undo after a failed set-up, inside an except: the set-up's error is the one raised."""
        try:
            self.run()
        except BaseException:  # the set-up failure is the first error: it is the one raised
            pass


@dataclass
class OpenedDevice:
    """A device opened for a VM, and the steps that release it, newest first."""

    device: VfioDevice
    path: str  #: "group" or "cdev"
    undo: Undo = field(default_factory=Undo)

    def close(self) -> None:
        """Release the device: device fd, then its FILE_DEL and group or cdev."""
        self.undo.run()


class VfioAssignments:
    """The VFIO state a VM's devices share, and the opening of each device."""

    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        self.vm = vm
        self.memory = memory
        self.kvm_vfio: KvmVfioDevice | None = None
        self.container: VfioContainer | None = None
        #: per group: the group, its registration, its users, and how to release it
        self.groups: dict[int, tuple[VfioGroup, VfioRegistration, list[str], Undo]] = {}
        self.container_maps = Undo()  #: the container's DMA maps, each really made
        self.iommufd: Iommufd | None = None
        self.ioas: int | None = None
        self.shared = Undo()  #: the container, the iommufd and IOAS, the KVM-VFIO device
        self.opened: list[OpenedDevice] = []

    def _kvm_vfio(self) -> KvmVfioDevice:
        if self.kvm_vfio is None:
            self.kvm_vfio = KvmVfioDevice(self.vm)
            self.shared.push(self._close_kvm_vfio)
        return self.kvm_vfio

    def _close_kvm_vfio(self) -> None:
        kvm_vfio, self.kvm_vfio = self.kvm_vfio, None
        kvm_vfio.close()

    def open(self, host: hostdev.HostDevice, path: str = "auto") -> OpenedDevice:
        """Open a host device for this VM on the group or cdev path (auto: cdev if possible)."""
        if path not in VFIO_PATHS:
            raise ConfigurationError(f"--vfio {path}: use one of {', '.join(VFIO_PATHS)}")
        # The same diagnosis, in the same order, as `pyvmm devices`: no IOMMU first.
        hostdev.check_iommu(host)
        hostdev.check_bound(host)
        # The cdev path claims DMA ownership of the whole group at bind, as the group path
        # needs a viable group: both fail on a group with a member on a host driver.
        hostdev.check_viable(host)
        cdev = hostdev.cdev_node(host)
        if path == "auto":
            path = "cdev" if cdev is not None and os.path.exists(IOMMUFD_PATH) else "group"
        check_memlock(self.memory)
        if path == "cdev":
            if cdev is None:
                raise VfioUnavailableError(
                    f"{host.name} has no VFIO device cdev (no vfio-dev in sysfs): the kernel "
                    "lacks CONFIG_VFIO_DEVICE_CDEV; use --vfio group"
                )
            opened = self._open_cdev(host, str(cdev))
        else:
            opened = self._open_group(host)
        self.opened.append(opened)
        return opened

    # ---- group path ----------------------------------------------------------------------
    def _ensure_container(self) -> VfioContainer:
        if self.container is None:
            container = VfioContainer(CONTAINER_PATH, _open_or_explain(CONTAINER_PATH, "VFIO"))
            try:
                container.get_api_version()
                if not container.check_extension(3):
                    raise VfioUnavailableError("the VFIO container lacks the type1v2 IOMMU driver")
            except BaseException:
                container.close()
                raise
            self.container = container
            self.shared.push(self._close_container)
        return self.container

    def _close_container(self) -> None:
        container, self.container = self.container, None
        container.close()

    def _map_container(self, container: VfioContainer) -> None:
        for region in self.memory.regions:
            container.map_dma(region.host_address, region.guest_phys_addr, region.size)
            self.container_maps.push(
                lambda iova=region.guest_phys_addr, size=region.size: container.unmap_dma(
                    iova, size
                )
            )

    def _join_group(self, host: hostdev.HostDevice, number: int) -> None:
        container = self._ensure_container()
        node = str(host.group_node)
        group = VfioGroup(node, _open_or_explain(node, f"IOMMU group {number}"))
        undo = Undo()
        undo.push(group.close)
        first = not self.groups
        try:
            if not group.get_status() & 1:
                raise GroupNotViableError(
                    f"IOMMU group {number} is not viable: bind every device in "
                    f"/sys/kernel/iommu_groups/{number}/devices to vfio-pci (pyvmm devices)"
                )
            registration = self._kvm_vfio().add_file(group)
            undo.push(registration.close)
            group.set_container(container)
            undo.push(group.unset_container)
            if first:
                # The container drops its IOMMU, and its maps, when its last group leaves:
                # unmap while it has one, before the unset.
                undo.push(self.container_maps.run)
                container.set_iommu()
                self._map_container(container)
        except BaseException:
            undo.unwind()
            raise
        self.groups[number] = (group, registration, [], undo)

    def _open_group(self, host: hostdev.HostDevice) -> OpenedDevice:
        if host.iommu_group is None:
            raise VfioUnavailableError(f"{host.name} has no IOMMU group: enable the IOMMU")
        number = host.iommu_group
        if number not in self.groups:
            self._join_group(host, number)
        _group, registration, users, _undo = self.groups[number]
        users.append(host.name)
        opened = OpenedDevice(None, "group")  # type: ignore[arg-type] - set just below
        opened.undo.push(lambda: self._release_group(number, host.name))
        try:
            opened.device = registration.open_device(host.name)
        except BaseException as error:
            opened.undo.unwind()
            if isinstance(error, VfioIoctlError) and error.errno == errno.EBUSY:
                raise DeviceBusyError(f"{host.name} is already open: {error.message}") from None
            raise
        opened.undo.push(opened.device.close)
        return opened

    def _release_group(self, number: int, name: str) -> None:
        _group, _registration, users, undo = self.groups[number]
        users.remove(name)
        if users:
            return
        del self.groups[number]
        undo.run()

    # ---- cdev path -----------------------------------------------------------------------
    def _ensure_ioas(self) -> tuple[Iommufd, int]:
        if self.iommufd is None:
            iommufd = Iommufd(IOMMUFD_PATH, _open_or_explain(IOMMUFD_PATH, "iommufd"))
            undo = Undo()
            undo.push(iommufd.close)
            try:
                ioas = iommufd.ioas_alloc()
                undo.push(lambda: iommufd.destroy(ioas))
                for region in self.memory.regions:
                    iommufd.ioas_map(ioas, region.host_address, region.size, region.guest_phys_addr)
                    undo.push(
                        lambda iova=region.guest_phys_addr, size=region.size: iommufd.ioas_unmap(
                            ioas, iova, size
                        )
                    )
            except BaseException:
                undo.unwind()
                raise
            self.iommufd, self.ioas = iommufd, ioas
            self.shared.push(self._forget_ioas)
            self.shared.push(undo.run)
        return self.iommufd, self.ioas

    def _forget_ioas(self) -> None:
        self.iommufd, self.ioas = None, None

    def _open_cdev(self, host: hostdev.HostDevice, node: str) -> OpenedDevice:
        iommufd, ioas = self._ensure_ioas()
        cdev = VfioDeviceCdev(node, _open_or_explain(node, f"the device {host.name}"))
        opened = OpenedDevice(None, "cdev")  # type: ignore[arg-type] - set once bound
        # Teardown: detach (DMA stops), FILE_DEL (KVM lets go of the file), close (the
        # device is released).
        opened.undo.push(cdev.close)
        try:
            registration = self._kvm_vfio().add_file(cdev)
            opened.undo.push(registration.close)
            try:
                opened.device = registration.open_device(host.name, iommufd.fd)
            except VfioIoctlError as error:
                if error.errno in (errno.EBUSY, errno.EINVAL):
                    raise DeviceBusyError(
                        f"{host.name}: {error.message} (it is in use by another process, or "
                        "its driver refused to open)"
                    ) from None
                raise
            cdev.attach_iommufd_pt(ioas)
            opened.undo.push(cdev.detach_iommufd_pt)
        except BaseException:
            opened.undo.unwind()
            raise
        return opened

    # ---- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Release every device, then the DMA contexts and the KVM-VFIO device.

        Every step runs even when one fails; the first failure is raised at the end.
        """
        undo = Undo()
        undo.push(self.shared.run)
        for opened in self.opened:
            undo.push(opened.close)
        self.opened = []
        undo.run()
