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
the device was already opened without kvm. pyvmm enforces it by construction: neither
VfioGroup nor VfioDeviceCdev can open a device. Only a ``VfioRegistration`` can, and the
only way to get one is ``KvmVfioDevice.add_file()``, which issues FILE_ADD first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyvmm._native import ffi, lib
from pyvmm.errors import KvmIoctlError
from pyvmm.ioctl import Cdata, FileHandle, ioctl, ioctl_value
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


class VfioGroup(FileHandle):
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
            f'"{name}"',
            VfioIoctlError,
        )


class VfioDeviceCdev(FileHandle):
    """/dev/vfio/devices/vfioN: a device's own VFIO file, unusable until bound to iommufd."""

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(fd, path)

    def _bind_iommufd(self, iommufd_fd: int) -> int:
        # Private on purpose: reached only through VfioRegistration.open_device().
        request = _argsz("struct vfio_device_bind_iommufd", iommufd=iommufd_fd)
        ioctl(
            self.fd,
            lib.VFIO_DEVICE_BIND_IOMMUFD,
            "VFIO_DEVICE_BIND_IOMMUFD",
            request,
            lambda: f"iommufd={iommufd_fd}, out devid={request.out_devid}",
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

    def __init__(self, fd: int, name: str, path: str, owns_fd: bool = True) -> None:
        super().__init__(fd, path)
        self.name = name
        self.owns_fd = owns_fd
        self.regions: dict[int, RegionInfo] = {}

    def close(self) -> None:
        """Close the device fd (on the cdev path the cdev owns it and closes it later)."""
        if self.owns_fd:
            super().close()
        self.fd = -1

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

#: Held by this module alone, so VfioRegistration cannot be made outside add_file().
_REGISTRATION_KEY = object()


class VfioRegistration:
    """Proof that a VFIO file is registered with the VM's KVM-VFIO device; opens its devices.

    Why this class exists: Documentation/virt/kvm/devices/vfio.rst asks for
    KVM_DEV_VFIO_FILE_ADD "prior to" VFIO_GROUP_GET_DEVICE_FD and before
    VFIO_DEVICE_BIND_IOMMUFD, because the open hands the driver's open_device the kvm pointer
    the file holds at that moment (kvmgt and vfio-ap need it); the kernel accepts the wrong
    order silently. So the opening ioctls live here, and a registration is obtained only from
    ``KvmVfioDevice.add_file()``, after KVM_DEV_VFIO_FILE_ADD succeeded: no sequence of public
    calls opens an unregistered device. ``close()`` issues KVM_DEV_VFIO_FILE_DEL, after the
    devices opened through it are closed.
    """

    def __init__(self, key: object, owner: KvmVfioDevice, file: VfioFile) -> None:
        if key is not _REGISTRATION_KEY:
            raise TypeError("a VfioRegistration comes from KvmVfioDevice.add_file() only")
        self.owner = owner
        self.file: VfioFile | None = file

    def open_device(self, name: str, iommufd_fd: int = -1) -> VfioDevice:
        """Open the device: VFIO_GROUP_GET_DEVICE_FD(name), or VFIO_DEVICE_BIND_IOMMUFD."""
        file = self.file
        if file is None:
            raise ValueError("this VFIO file is no longer registered with KVM")
        if isinstance(file, VfioGroup):
            return VfioDevice(file._get_device_fd(name), name, f"device {name}")
        file._bind_iommufd(iommufd_fd)
        # On the cdev path the bound cdev fd is the device fd; the cdev keeps owning it.
        return VfioDevice(file.fd, name, file.path, owns_fd=False)

    def close(self) -> None:
        """KVM_DEV_VFIO_FILE_DEL; the file itself stays open for its owner to close."""
        if self.file is not None and self.file.fd >= 0:
            self.owner.device.vfio_file(lib.KVM_DEV_VFIO_FILE_DEL, self.file.fd, self.file.path)
        self.file = None


class KvmVfioDevice:
    """The VM's one KVM-VFIO pseudo device: the registry of the VFIO files the VM uses.

    Keep it open for the VM's life: closing it drops every registration.
    """

    def __init__(self, vm: Vm) -> None:
        self.device: KvmDevice = vm.create_device(lib.KVM_DEV_TYPE_VFIO)

    def add_file(self, file: VfioFile) -> VfioRegistration:
        """KVM_DEV_VFIO_FILE_ADD of a group or device cdev fd; returns what opens its devices."""
        self.device.vfio_file(lib.KVM_DEV_VFIO_FILE_ADD, file.fd, file.path)
        return VfioRegistration(_REGISTRATION_KEY, self, file)

    def close(self) -> None:
        """Close the KVM-VFIO device (dropping any registration still left)."""
        self.device.close()
