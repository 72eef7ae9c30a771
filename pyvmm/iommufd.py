"""Thin typed wrappers over the iommufd ioctls (/dev/iommu, Linux 6.2+): one method each.

pyvmm uses one I/O address space (IOAS) per VM: guest RAM is mapped into it at IOVA =
guest-physical address, and every device bound through its VFIO cdev is attached to it.
"""

from __future__ import annotations

from pyvmm._native import ffi, lib
from pyvmm.ioctl import FileHandle, ioctl
from pyvmm.vfio import VfioIoctlError

_MAP_FLAGS = (
    (lib.IOMMU_IOAS_MAP_FIXED_IOVA, "FIXED_IOVA"),
    (lib.IOMMU_IOAS_MAP_WRITEABLE, "WRITEABLE"),
    (lib.IOMMU_IOAS_MAP_READABLE, "READABLE"),
)


def _sized(ctype: str, **fields: int):
    value = ffi.new(f"{ctype} *", fields)
    value.size = ffi.sizeof(ctype)
    return value


class Iommufd(FileHandle):
    """/dev/iommu: I/O address spaces and the mappings in them."""

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(fd, path)

    def ioas_alloc(self) -> int:
        """IOMMU_IOAS_ALLOC: a new, empty I/O address space; returns its id."""
        request = _sized("struct iommu_ioas_alloc")
        ioctl(
            self.fd,
            lib.IOMMU_IOAS_ALLOC,
            "IOMMU_IOAS_ALLOC",
            request,
            lambda: f"out ioas_id={request.out_ioas_id}",
            VfioIoctlError,
        )
        return request.out_ioas_id

    def ioas_map(self, ioas_id: int, user_va: int, length: int, iova: int) -> None:
        """IOMMU_IOAS_MAP at a fixed IOVA, readable and writeable by devices (pins the pages)."""
        flags = (
            lib.IOMMU_IOAS_MAP_FIXED_IOVA
            | lib.IOMMU_IOAS_MAP_WRITEABLE
            | lib.IOMMU_IOAS_MAP_READABLE
        )
        request = _sized(
            "struct iommu_ioas_map",
            flags=flags,
            ioas_id=ioas_id,
            user_va=user_va,
            length=length,
            iova=iova,
        )
        ioctl(
            self.fd,
            lib.IOMMU_IOAS_MAP,
            "IOMMU_IOAS_MAP",
            request,
            lambda: (
                "|".join(name for bit, name in _MAP_FLAGS if flags & bit)
                + f", ioas_id={ioas_id}, user_va={user_va:#x}, length={length:#x}, iova={iova:#x}"
            ),
            VfioIoctlError,
        )

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> None:
        """IOMMU_IOAS_UNMAP of a whole earlier mapping."""
        request = _sized("struct iommu_ioas_unmap", ioas_id=ioas_id, iova=iova, length=length)
        ioctl(
            self.fd,
            lib.IOMMU_IOAS_UNMAP,
            "IOMMU_IOAS_UNMAP",
            request,
            f"ioas_id={ioas_id}, iova={iova:#x}, length={length:#x}",
            VfioIoctlError,
        )

    def destroy(self, object_id: int) -> None:
        """IOMMU_DESTROY of an IOAS (or any other iommufd object)."""
        request = _sized("struct iommu_destroy", id=object_id)
        ioctl(
            self.fd, lib.IOMMU_DESTROY, "IOMMU_DESTROY", request, f"id={object_id}", VfioIoctlError
        )
