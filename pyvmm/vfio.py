"""Thin typed wrappers over the VFIO ioctls, and the KVM-VFIO registration that must precede
every device open.

The files, one class each, one method per ioctl:

- ``VfioContainer``: /dev/vfio/vfio, the legacy IOMMU context (type1v2 DMA maps).
- ``VfioGroup``: /dev/vfio/N, one IOMMU group, attached to a container.
- ``VfioDeviceCdev``: /dev/vfio/devices/vfioN (Linux 6.6+), one device, bound to iommufd.
- ``VfioDevice``: an opened device: info, regions, interrupts, reset, config and BAR access.
- ``KvmVfioDevice``: the VM's KVM-VFIO pseudo device (KVM_DEV_TYPE_VFIO).

The order rule. Documentation/virt/kvm/devices/vfio.rst: KVM_DEV_VFIO_FILE_ADD "should be
invoked prior to" VFIO_GROUP_GET_DEVICE_FD, and for a device cdev "before
VFIO_DEVICE_BIND_IOMMUFD": the open hands the driver's open_device the kvm pointer recorded
on the file at that moment, and drivers such as Intel kvmgt and vfio-ap refuse to open (or
misbehave) without it. The kernel does not enforce the order: a late FILE_ADD succeeds, but
the device was already opened without kvm. pyvmm enforces it by construction, for every
sequence of the public calls here:

- Neither VfioGroup nor VfioDeviceCdev can open a device. Only a ``VfioRegistration`` can,
  and the only way to get one is ``KvmVfioDevice.add_file()``, which issues FILE_ADD first;
  the KVM-VFIO device's fd and attributes are private to KvmVfioDevice.
- A registration opens only while it is live: not closed, its KvmVfioDevice not closed, its
  file's fd still open on the same node. One registration per file in the process.
- Closing closes what was opened through it first: a registration its devices (then
  FILE_DEL), a file its registration, a KvmVfioDevice its registrations. So no FILE_DEL, and
  no release of the KVM-VFIO device, comes before the close of a device opened from a file.

Calls that would break a rule raise ``VfioOrderError`` before any ioctl (docs/assign.md).
The files and the registration stay in this one module on purpose: the opening ioctls are
private to it, and reached only from ``VfioRegistration.open_device()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm._native import ffi, lib
from pyvmm.errors import DeviceAssignmentError, KvmIoctlError
from pyvmm.ioctl import Cdata, FileHandle, ioctl, ioctl_value, trace
from pyvmm.kvm import KvmDevice, Vm

_REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM"}
_REGION_NAMES |= {7: "CONFIG", 8: "VGA"}
_IRQ_NAMES = {0: "INTX", 1: "MSI", 2: "MSIX", 3: "ERR", 4: "REQ"}
_SET_IRQS_FLAGS = (
    (lib.VFIO_IRQ_SET_DATA_NONE, "DATA_NONE"),
    (lib.VFIO_IRQ_SET_DATA_BOOL, "DATA_BOOL"),
    (lib.VFIO_IRQ_SET_DATA_EVENTFD, "DATA_EVENTFD"),
    (lib.VFIO_IRQ_SET_ACTION_MASK, "ACTION_MASK"),
    (lib.VFIO_IRQ_SET_ACTION_UNMASK, "ACTION_UNMASK"),
    (lib.VFIO_IRQ_SET_ACTION_TRIGGER, "ACTION_TRIGGER"),
)


class VfioIoctlError(KvmIoctlError):
    """A VFIO or iommufd ioctl failed; the message names the ioctl and the errno."""


def _argsz(ctype: str, **fields: int) -> Cdata:
    value = ffi.new(f"{ctype} *", fields)
    value.argsz = ffi.sizeof(ctype)
    return value


class VfioContainer(FileHandle):
    """/dev/vfio/vfio: an IOMMU context that groups join, with type1v2 DMA mappings."""

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(fd, path)

    def get_api_version(self) -> int:
        """VFIO_GET_API_VERSION (0 on every kernel)."""
        return ioctl_value(self.fd, lib.VFIO_GET_API_VERSION, "VFIO_GET_API_VERSION", 0, "")

    def check_extension(self, extension: int) -> bool:
        """VFIO_CHECK_EXTENSION, e.g. VFIO_TYPE1v2_IOMMU."""
        return bool(
            ioctl_value(
                self.fd,
                lib.VFIO_CHECK_EXTENSION,
                "VFIO_CHECK_EXTENSION",
                extension,
                f"{'VFIO_TYPE1v2_IOMMU' if extension == lib.VFIO_TYPE1v2_IOMMU else extension}",
                VfioIoctlError,
            )
        )

    def set_iommu(self, iommu_type: int = lib.VFIO_TYPE1v2_IOMMU) -> None:
        """VFIO_SET_IOMMU: choose the IOMMU model, after the first group joined."""
        ioctl_value(
            self.fd,
            lib.VFIO_SET_IOMMU,
            "VFIO_SET_IOMMU",
            iommu_type,
            "VFIO_TYPE1v2_IOMMU" if iommu_type == lib.VFIO_TYPE1v2_IOMMU else str(iommu_type),
            VfioIoctlError,
        )

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        """VFIO_IOMMU_MAP_DMA: let devices read and write host memory at IOVA (pins it)."""
        flags = lib.VFIO_DMA_MAP_FLAG_READ | lib.VFIO_DMA_MAP_FLAG_WRITE
        request = _argsz(
            "struct vfio_iommu_type1_dma_map", flags=flags, vaddr=vaddr, iova=iova, size=size
        )
        ioctl(
            self.fd,
            lib.VFIO_IOMMU_MAP_DMA,
            "VFIO_IOMMU_MAP_DMA",
            request,
            f"READ|WRITE, vaddr={vaddr:#x}, iova={iova:#x}, size={size:#x}",
            VfioIoctlError,
        )

    def unmap_dma(self, iova: int, size: int) -> None:
        """VFIO_IOMMU_UNMAP_DMA of one earlier mapping."""
        request = _argsz("struct vfio_iommu_type1_dma_unmap", iova=iova, size=size)
        ioctl(
            self.fd,
            lib.VFIO_IOMMU_UNMAP_DMA,
            "VFIO_IOMMU_UNMAP_DMA",
            request,
            f"iova={iova:#x}, size={size:#x}",
            VfioIoctlError,
        )


class _VfioFileHandle(FileHandle):
    """A group or device cdev file: what KVM-VFIO registers, and what devices open through."""

    _registration: VfioRegistration | None = None

    def close(self) -> None:
        """Close the file; a registration it still has is closed first (devices, FILE_DEL)."""
        try:
            if self._registration is not None:
                self._registration.close()
        finally:
            super().close()


class VfioGroup(_VfioFileHandle):
    """/dev/vfio/N: an IOMMU group. It cannot open its devices itself: see the module doc."""

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(fd, path)

    def get_status(self) -> int:
        """VFIO_GROUP_GET_STATUS flags: VIABLE (every member bound to VFIO or to no driver)."""
        status = _argsz("struct vfio_group_status")
        ioctl(
            self.fd,
            lib.VFIO_GROUP_GET_STATUS,
            "VFIO_GROUP_GET_STATUS",
            status,
            lambda: (
                f"out flags={'VIABLE' if status.flags & 1 else 'not viable'}"
                f"{'|CONTAINER_SET' if status.flags & 2 else ''}"
            ),
            VfioIoctlError,
        )
        return status.flags

    def set_container(self, container: VfioContainer) -> None:
        """VFIO_GROUP_SET_CONTAINER: join the container's IOMMU context."""
        value = ffi.new("int32_t *", container.fd)
        ioctl(
            self.fd,
            lib.VFIO_GROUP_SET_CONTAINER,
            "VFIO_GROUP_SET_CONTAINER",
            value,
            f"container fd {container.fd}",
            VfioIoctlError,
        )

    def unset_container(self) -> None:
        """VFIO_GROUP_UNSET_CONTAINER: leave the container (no device may be open)."""
        ioctl(
            self.fd,
            lib.VFIO_GROUP_UNSET_CONTAINER,
            "VFIO_GROUP_UNSET_CONTAINER",
            ffi.NULL,
            "",
            VfioIoctlError,
        )

    def _get_device_fd(self, name: str) -> int:
        # Private on purpose: reached only through VfioRegistration.open_device().
        text = ffi.new("char[]", name.encode())
        return ioctl(
            self.fd,
            lib.VFIO_GROUP_GET_DEVICE_FD,
            "VFIO_GROUP_GET_DEVICE_FD",
            text,
            f'fd {self.fd} {self.path}, "{name}"',
            VfioIoctlError,
        )


class VfioDeviceCdev(_VfioFileHandle):
    """/dev/vfio/devices/vfioN: a device's own VFIO file, unusable until bound to iommufd."""

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(fd, path)
        #: Bound to iommufd (the device is open) until the file is released; never twice.
        self._bound = False

    def _bind_iommufd(self, iommufd_fd: int) -> int:
        # Private on purpose: reached only through VfioRegistration.open_device().
        request = _argsz("struct vfio_device_bind_iommufd", iommufd=iommufd_fd)
        ioctl(
            self.fd,
            lib.VFIO_DEVICE_BIND_IOMMUFD,
            "VFIO_DEVICE_BIND_IOMMUFD",
            request,
            lambda: (
                f"fd {self.fd} {self.path}, iommufd={iommufd_fd}, out devid={request.out_devid}"
            ),
            VfioIoctlError,
        )
        return request.out_devid

    def attach_iommufd_pt(self, pt_id: int) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT: put the bound device's DMA in an IOAS (or HWPT)."""
        request = _argsz("struct vfio_device_attach_iommufd_pt", pt_id=pt_id)
        ioctl(
            self.fd,
            lib.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            request,
            lambda: f"pt_id={pt_id}, out pt_id={request.pt_id}",
            VfioIoctlError,
        )
        return request.pt_id

    def detach_iommufd_pt(self) -> None:
        """VFIO_DEVICE_DETACH_IOMMUFD_PT: stop the device's DMA translation."""
        request = _argsz("struct vfio_device_detach_iommufd_pt")
        ioctl(
            self.fd,
            lib.VFIO_DEVICE_DETACH_IOMMUFD_PT,
            "VFIO_DEVICE_DETACH_IOMMUFD_PT",
            request,
            "",
            VfioIoctlError,
        )


@dataclass(frozen=True)
class RegionInfo:
    """One VFIO region (a BAR, the ROM, config space): where it is in the device fd."""

    index: int
    flags: int
    size: int
    offset: int
    #: (offset, size) parts that may be mmap'd; the whole region when it has no sparse cap.
    mmap_areas: tuple[tuple[int, int], ...] = ()
    msix_mappable: bool = False

    @property
    def can_mmap(self) -> bool:
        """Whether any part of the region may be mmap'd."""
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_MMAP) and bool(self.mmap_areas)


@dataclass(frozen=True)
class IrqInfo:
    """One VFIO interrupt index (INTx, MSI, MSI-X): how many vectors and how they behave."""

    index: int
    flags: int
    count: int

    @property
    def automasked(self) -> bool:
        """INTx masks itself when it fires and must be unmasked after the guest's EOI."""
        return bool(self.flags & lib.VFIO_IRQ_INFO_AUTOMASKED)


class VfioDevice(FileHandle):
    """An opened VFIO device: the fd from VFIO_GROUP_GET_DEVICE_FD, or a bound cdev's fd."""

    def __init__(
        self,
        fd: int,
        name: str,
        path: str,
        owns_fd: bool = True,
        on_close: Callable[[VfioDevice], None] | None = None,
    ) -> None:
        super().__init__(fd, path)
        self.name = name
        self.owns_fd = owns_fd
        self.regions: dict[int, RegionInfo] = {}
        self._on_close = on_close

    def close(self) -> None:
        """Close the device; closing twice is harmless.

        On the group path this closes the device fd, which releases the device. On the cdev
        path the cdev owns the fd: pyvmm stops using it here, and the kernel releases the
        device when the cdev file goes (after its FILE_DEL, since KVM-VFIO holds the file).
        """
        if self.fd < 0:
            return
        if self.owns_fd:
            super().close()
        else:
            trace(f"close(device {self.name}, fd {self.fd} {self.path}: released with the cdev)")
            self.fd = -1
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)

    def get_info(self) -> tuple[int, int, int]:
        """VFIO_DEVICE_GET_INFO: (flags, num_regions, num_irqs)."""
        info = _argsz("struct vfio_device_info")
        ioctl(
            self.fd,
            lib.VFIO_DEVICE_GET_INFO,
            "VFIO_DEVICE_GET_INFO",
            info,
            lambda: (
                f"out flags={info.flags:#x}, num_regions={info.num_regions}, "
                f"num_irqs={info.num_irqs}"
            ),
            VfioIoctlError,
        )
        return info.flags, info.num_regions, info.num_irqs

    def get_region_info(self, index: int) -> RegionInfo:
        """VFIO_DEVICE_GET_REGION_INFO, with the sparse-mmap and MSI-X capabilities read."""
        size = ffi.sizeof("struct vfio_region_info")
        while True:
            raw = ffi.new("uint8_t[]", size)
            info = ffi.cast("struct vfio_region_info *", raw)
            info.argsz, info.index = size, index
            ioctl(
                self.fd,
                lib.VFIO_DEVICE_GET_REGION_INFO,
                "VFIO_DEVICE_GET_REGION_INFO",
                info,
                lambda info=info: (
                    f"{_REGION_NAMES.get(index, index)}, out flags={info.flags:#x}, "
                    f"size={info.size:#x}, offset={info.offset:#x}"
                ),
                VfioIoctlError,
            )
            if info.argsz <= size:
                break
            size = info.argsz  # capabilities did not fit: ask again with room for them
        areas: tuple[tuple[int, int], ...] = ((0, info.size),)
        msix_mappable = False
        next_cap = info.cap_offset if info.flags & lib.VFIO_REGION_INFO_FLAG_CAPS else 0
        while next_cap:
            header = ffi.cast("struct vfio_info_cap_header *", raw + next_cap)
            if header.id == lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                sparse = ffi.cast("struct vfio_region_info_cap_sparse_mmap *", header)
                areas = tuple(
                    (sparse.areas[i].offset, sparse.areas[i].size)
                    for i in range(sparse.nr_areas)
                    if sparse.areas[i].size
                )
            elif header.id == lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                msix_mappable = True
            next_cap = header.next
        region = RegionInfo(index, info.flags, info.size, info.offset, areas, msix_mappable)
        self.regions[index] = region
        return region

    def get_irq_info(self, index: int) -> IrqInfo:
        """VFIO_DEVICE_GET_IRQ_INFO for one index (VFIO_PCI_INTX/MSI/MSIX_IRQ_INDEX)."""
        info = _argsz("struct vfio_irq_info", index=index)
        ioctl(
            self.fd,
            lib.VFIO_DEVICE_GET_IRQ_INFO,
            "VFIO_DEVICE_GET_IRQ_INFO",
            info,
            lambda: (
                f"{_IRQ_NAMES.get(index, index)}, out flags={info.flags:#x}, count={info.count}"
            ),
            VfioIoctlError,
        )
        return IrqInfo(index, info.flags, info.count)

    def set_irqs(
        self, index: int, flags: int, start: int = 0, count: int = 0, fds: list[int] | None = None
    ) -> None:
        """VFIO_DEVICE_SET_IRQS: eventfds (DATA_EVENTFD, -1 drops one) or none for vectors."""
        fds = fds or []
        size = ffi.sizeof("struct vfio_irq_set") + 4 * len(fds)
        raw = ffi.new("uint8_t[]", size)
        request = ffi.cast("struct vfio_irq_set *", raw)
        request.argsz, request.flags, request.index = size, flags, index
        request.start, request.count = start, count
        data = ffi.cast("int32_t *", request.data)
        for i, fd in enumerate(fds):
            data[i] = fd
        ioctl(
            self.fd,
            lib.VFIO_DEVICE_SET_IRQS,
            "VFIO_DEVICE_SET_IRQS",
            request,
            lambda: (
                f"{_IRQ_NAMES.get(index, index)}, "
                + "|".join(name for bit, name in _SET_IRQS_FLAGS if flags & bit)
                + f", start={start}, count={count}"
                + (f", eventfds={fds}" if fds else "")
            ),
            VfioIoctlError,
        )

    def reset(self) -> None:
        """VFIO_DEVICE_RESET (a function-level or similar reset, where the device has one)."""
        ioctl(self.fd, lib.VFIO_DEVICE_RESET, "VFIO_DEVICE_RESET", ffi.NULL, "", VfioIoctlError)

    def read(self, region: int, offset: int, size: int) -> int:
        """Read a little-endian value of size bytes from a region (config space, a BAR)."""
        data = os.pread(self.fd, size, self.regions[region].offset + offset)
        if len(data) != size:
            raise VfioIoctlError(f"pread of {_REGION_NAMES.get(region, region)}", 5)
        return int.from_bytes(data, "little")

    def write(self, region: int, offset: int, size: int, value: int) -> None:
        """Write a little-endian value of size bytes to a region."""
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if os.pwrite(self.fd, data, self.regions[region].offset + offset) != size:
            raise VfioIoctlError(f"pwrite of {_REGION_NAMES.get(region, region)}", 5)


VfioFile = VfioGroup | VfioDeviceCdev


class VfioOrderError(DeviceAssignmentError):
    """A VFIO call refused before any ioctl: it would break the order rule (module doc)."""


#: Held by this module alone, so VfioRegistration cannot be made outside add_file().
_REGISTRATION_KEY = object()

#: Every live registration in the process, by its file's device number (st_rdev). The kernel
#: keeps one kvm per VFIO file, so a second FILE_ADD of the same file (a dup of its fd, from
#: any VM) would replace it, and that one's FILE_DEL would clear it under the first.
#: A group node opens exclusively, so its number names one file; a device cdev may be open
#: more than once, but only one of its files can bind, so one registration each is no loss.
_live_registrations: dict[int, VfioRegistration] = {}

_FILE_ATTR_NAMES = {
    lib.KVM_DEV_VFIO_FILE_ADD: "KVM_DEV_VFIO_FILE_ADD",
    lib.KVM_DEV_VFIO_FILE_DEL: "KVM_DEV_VFIO_FILE_DEL",
}


def _file_number(file: VfioFile) -> int:
    """The device number of the node file.fd refers to; refused when the fd is closed."""
    if file.fd < 0:
        raise VfioOrderError(f"{file.path} is closed: open it again")
    try:
        return os.fstat(file.fd).st_rdev
    except OSError:
        raise VfioOrderError(
            f"fd {file.fd} of {file.path} is no longer open (closed behind pyvmm's back): "
            "open the file again"
        ) from None


class VfioRegistration:
    """Proof that a VFIO file is registered with a live KVM-VFIO device; opens its devices.

    Why this class exists: Documentation/virt/kvm/devices/vfio.rst asks for
    KVM_DEV_VFIO_FILE_ADD "prior to" VFIO_GROUP_GET_DEVICE_FD and before
    VFIO_DEVICE_BIND_IOMMUFD, because the open hands the driver's open_device the kvm pointer
    the file holds at that moment (kvmgt and vfio-ap need it); the kernel accepts the wrong
    order silently. So the opening ioctls live here, and a registration is obtained only from
    ``KvmVfioDevice.add_file()``, after KVM_DEV_VFIO_FILE_ADD succeeded.

    ``open_device()`` works only while the registration is live: not closed, its KVM-VFIO
    device not closed, its file's fd still open on the same node. ``close()`` closes every
    device opened through it first, then issues KVM_DEV_VFIO_FILE_DEL: a file never loses its
    kvm while a device opened from it is open.
    """

    def __init__(self, key: object, owner: KvmVfioDevice, file: VfioFile, number: int) -> None:
        if key is not _REGISTRATION_KEY:
            raise TypeError("a VfioRegistration comes from KvmVfioDevice.add_file() only")
        self.owner = owner
        self.file = file
        self._number = number
        self._devices: list[VfioDevice] = []
        self.live = True

    @property
    def devices(self) -> tuple[VfioDevice, ...]:
        """The devices opened through this registration and not closed yet."""
        return tuple(self._devices)

    def open_device(self, name: str, iommufd_fd: int = -1) -> VfioDevice:
        """Open the device: VFIO_GROUP_GET_DEVICE_FD(name), or VFIO_DEVICE_BIND_IOMMUFD.

        Refused (VfioOrderError, no ioctl) when the registration is not live, when the group's
        device name is already open through it, or when the cdev was bound before.
        """
        file = self.file
        if not self.live:
            raise VfioOrderError(
                f"{file.path} is no longer registered with KVM (its registration or its "
                "KVM-VFIO device was closed): register it again with add_file()"
            )
        if not self._file_still_open():
            raise VfioOrderError(
                f"fd {file.fd} no longer refers to {file.path} (closed behind pyvmm's back): "
                "open the file again and register it"
            )
        if isinstance(file, VfioGroup):
            if any(device.name == name for device in self._devices):
                raise VfioOrderError(
                    f"{name} is already open through {file.path}: use that VfioDevice, or "
                    "close it first"
                )
            device = VfioDevice(
                file._get_device_fd(name), name, f"device {name}", on_close=self._closed
            )
        else:
            if file._bound:
                raise VfioOrderError(
                    f"{file.path} was bound already (a cdev file binds once): close it and "
                    "open the cdev again"
                )
            file._bind_iommufd(iommufd_fd)
            file._bound = True
            # On the cdev path the bound cdev fd is the device fd; the cdev keeps owning it.
            device = VfioDevice(file.fd, name, file.path, owns_fd=False, on_close=self._closed)
        self._devices.append(device)
        return device

    def _closed(self, device: VfioDevice) -> None:
        self._devices.remove(device)

    def _file_still_open(self) -> bool:
        try:
            return _file_number(self.file) == self._number
        except VfioOrderError:
            return False  # no fd to name it by: the kernel drops it when KVM-VFIO closes

    def close(self) -> None:
        """Close the devices opened through it, then KVM_DEV_VFIO_FILE_DEL; the file stays
        open for its owner to close. Closing twice is harmless."""
        if not self.live:
            return
        try:
            while self._devices:
                self._devices[-1].close()
            if self._file_still_open():
                self.owner._set_file(lib.KVM_DEV_VFIO_FILE_DEL, self.file)
        finally:
            self.live = False
            _live_registrations.pop(self._number, None)
            self.owner._registrations.remove(self)
            self.file._registration = None


class KvmVfioDevice:
    """The VM's one KVM-VFIO pseudo device: the registry of the VFIO files the VM uses.

    Its fd and attributes are private: FILE_ADD happens only in ``add_file()``, FILE_DEL only
    in ``VfioRegistration.close()``. Keep it open for the VM's life: ``close()`` closes every
    registration first (each one's devices, then its FILE_DEL), then the device.
    """

    def __init__(self, vm: Vm) -> None:
        self._device: KvmDevice = vm.create_device(lib.KVM_DEV_TYPE_VFIO)
        self._registrations: list[VfioRegistration] = []

    @property
    def closed(self) -> bool:
        """Whether close() ran: no file can be registered with it any more."""
        return self._device.fd < 0

    @property
    def registrations(self) -> tuple[VfioRegistration, ...]:
        """The live registrations made through this device."""
        return tuple(self._registrations)

    def add_file(self, file: VfioFile) -> VfioRegistration:
        """KVM_DEV_VFIO_FILE_ADD of a group or device cdev fd; returns what opens its devices.

        Refused (VfioOrderError, no ioctl) when this device is closed, the file is closed, or
        the file is registered already (with this or any other KVM-VFIO device).
        """
        if self.closed:
            raise VfioOrderError(
                f"cannot register {file.path}: this KVM-VFIO device is closed; create a new "
                "KvmVfioDevice for the VM"
            )
        number = _file_number(file)
        held = _live_registrations.get(number)
        if held is not None:
            whose = "this" if held.owner is self else "another"
            raise VfioOrderError(
                f"{file.path} is already registered with {whose} KVM-VFIO device: open its "
                "devices through that registration, or close it first"
            )
        self._set_file(lib.KVM_DEV_VFIO_FILE_ADD, file)
        registration = VfioRegistration(_REGISTRATION_KEY, self, file, number)
        self._registrations.append(registration)
        _live_registrations[number] = registration
        file._registration = registration
        return registration

    def _set_file(self, attr: int, file: VfioFile) -> None:
        value = ffi.new("int32_t *", file.fd)
        self._device._set_attr(
            lib.KVM_DEV_VFIO_FILE,
            attr,
            int(ffi.cast("uintptr_t", value)),
            f"fd {self._device.fd} kvm-vfio, KVM_DEV_VFIO_FILE, {_FILE_ATTR_NAMES[attr]}, "
            f"fd {file.fd} {file.path}",
        )

    def close(self) -> None:
        """Close every registration (its devices, then FILE_DEL), then the KVM-VFIO device."""
        failure: BaseException | None = None
        while self._registrations:
            try:
                self._registrations[-1].close()
            except BaseException as error:  # close the rest, and the device, all the same
                failure = failure or error
        self._device.close()
        if failure is not None:
            raise failure
