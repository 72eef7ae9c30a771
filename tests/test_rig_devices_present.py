"""The rig's PCI devices for device assignment are there, in the state docs/rig.md describes.

An NVMe controller on vfio-pci with MSI-X; an edu on vfio-pci whose IOMMU group is not
viable (it shares it, behind a conventional PCI bridge, with a pci-serial the host's 8250
driver holds); that pci-serial as the device not bound to vfio-pci.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from tests.rig import BRIDGE_BDF, EDU_BDF, NONVIABLE_BDF, NVME_BDF, UNBOUND_BDF
from tests.test_rig_order import (
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_GROUP_FLAGS_VIABLE,
    VFIO_GROUP_GET_STATUS,
    buf,
    ioctl,
)

pytestmark = pytest.mark.rig

VFIO_DEVICE_GET_IRQ_INFO = 0x3B6D
VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX = 1, 2
VFIO_IRQ_INFO_EVENTFD = 1
PCI = Path("/sys/bus/pci/devices")


def driver(bdf: str) -> str | None:
    link = PCI / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.exists() else None


def group(bdf: str) -> str:
    return os.path.basename(os.readlink(PCI / bdf / "iommu_group"))


def cdev(bdf: str) -> str:
    (node,) = os.listdir(PCI / bdf / "vfio-dev")
    return f"/dev/vfio/devices/{node}"


def test_env_names_the_fixed_addresses() -> None:
    env = {k: os.environ.get(f"PYVMM_RIG_{k}") for k in ("EDU", "NVME", "NONVIABLE", "UNBOUND")}
    assert env == {
        "EDU": EDU_BDF,
        "NVME": NVME_BDF,
        "NONVIABLE": NONVIABLE_BDF,
        "UNBOUND": UNBOUND_BDF,
    }
    assert driver(EDU_BDF) == "vfio-pci"


def test_nvme_on_vfio_pci_with_msix() -> None:
    bdf = os.environ["PYVMM_RIG_NVME"]
    assert driver(bdf) == "vfio-pci"
    assert os.path.exists(f"/dev/vfio/{group(bdf)}")
    dev, iommufd = os.open(cdev(bdf), os.O_RDWR), os.open("/dev/iommu", os.O_RDWR)
    try:
        ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, buf("IIiI", 16, 0, iommufd, 0))
        irqs = {}
        for index in (VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX):
            info = buf("IIII", 16, 0, index, 0)
            ioctl(dev, VFIO_DEVICE_GET_IRQ_INFO, info)
            _, flags, _, count = struct.unpack("IIII", info.raw)
            irqs[index] = (flags & VFIO_IRQ_INFO_EVENTFD, count)
        assert irqs == {VFIO_PCI_MSI_IRQ_INDEX: (1, 0), VFIO_PCI_MSIX_IRQ_INDEX: (1, 65)}
        info = buf("IIIIQQ", 32, 0, 0, 0, 0, 0)  # BAR0: registers, doorbells, MSI-X table, PBA
        ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, info)
        _, _, _, _, size, offset = struct.unpack("IIIIQQ", info.raw)
        assert size == 0x4000
        assert struct.unpack("<I", os.pread(dev, 4, offset + 8))[0] == 0x10400  # VS: NVMe 1.4
    finally:
        os.close(dev)
        os.close(iommufd)


def test_nonviable_group() -> None:
    bdf = os.environ["PYVMM_RIG_NONVIABLE"]
    assert driver(bdf) == "vfio-pci" and os.path.exists(cdev(bdf))
    g = group(bdf)
    members = set(os.listdir(f"/sys/kernel/iommu_groups/{g}/devices"))
    assert members == {BRIDGE_BDF, bdf, os.environ["PYVMM_RIG_UNBOUND"]}
    assert driver(BRIDGE_BDF) is None
    fd = os.open(f"/dev/vfio/{g}", os.O_RDWR)
    try:
        status = buf("II", 8, 0)
        ioctl(fd, VFIO_GROUP_GET_STATUS, status)
        assert not struct.unpack("II", status.raw)[1] & VFIO_GROUP_FLAGS_VIABLE
    finally:
        os.close(fd)


def test_unbound_device_held_by_a_host_driver() -> None:
    bdf = os.environ["PYVMM_RIG_UNBOUND"]
    assert driver(bdf) == "serial"
    assert not (PCI / bdf / "vfio-dev").exists()
