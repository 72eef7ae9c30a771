"""The order rule, proven at the ioctl level inside the rig (no pyvmm code).

Registering a VFIO file with the KVM-VFIO device (KVM_DEV_VFIO_FILE_ADD)
BEFORE the device is opened (VFIO_GROUP_GET_DEVICE_FD on the group path,
VFIO_DEVICE_BIND_IOMMUFD on the cdev path) hands the device the VM's kvm
pointer; opening it first does not, and a late FILE_ADD is accepted but too
late. The kvm-requiring mtty_kvm mdev refuses to open without kvm (EINVAL),
and a kprobe on vfio_device_get_kvm_safe records the pointer each open gets.
These tests also show the rig can tell right from wrong: the wrong order must
visibly fail.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.rig

# include/uapi/linux/kvm.h
KVM_CREATE_VM = 0xAE01
KVM_CREATE_DEVICE = 0xC00CAEE0
KVM_SET_DEVICE_ATTR = 0x4018AEE1
KVM_DEV_TYPE_VFIO = 4
KVM_DEV_VFIO_FILE = 1
KVM_DEV_VFIO_FILE_ADD = 1
# include/uapi/linux/vfio.h
VFIO_GET_API_VERSION = 0x3B64
VFIO_CHECK_EXTENSION = 0x3B65
VFIO_SET_IOMMU = 0x3B66
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_SET_CONTAINER = 0x3B68
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
VFIO_DEVICE_GET_REGION_INFO = 0x3B6C
VFIO_DEVICE_BIND_IOMMUFD = 0x3B76
VFIO_DEVICE_ATTACH_IOMMUFD_PT = 0x3B77
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_CONFIG_REGION_INDEX = 7
# include/uapi/linux/iommufd.h
IOMMU_IOAS_ALLOC = 0x3B81

EDU_ID = 0x010000ED  # edu's BAR0 offset 0: version 1.0 and the magic 0xed

libc = ctypes.CDLL(None, use_errno=True)


def ioctl(fd: int, req: int, arg: int | ctypes.Array | ctypes._SimpleCData = 0) -> int:
    """ioctl(2) returning its int result; a buffer or ctypes value goes by pointer."""
    a = ctypes.c_ulong(arg) if isinstance(arg, int) else ctypes.c_void_p(ctypes.addressof(arg))
    r = libc.ioctl(fd, ctypes.c_ulong(req), a)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"ioctl {req:#x}: {os.strerror(e)}")
    return r


def buf(fmt: str, *vals: int) -> ctypes.Array:
    """A mutable C buffer holding struct.pack(fmt, *vals)."""
    return ctypes.create_string_buffer(struct.pack(fmt, *vals), struct.calcsize(fmt))


@dataclass
class Dev:
    """A VFIO device of the rig: its name for GET_DEVICE_FD, group and cdev node."""

    kind: str
    name: str
    sysfs: Path

    @property
    def group(self) -> str:
        return os.path.basename(os.readlink(self.sysfs / "iommu_group"))

    @property
    def cdev(self) -> str:
        (node,) = os.listdir(self.sysfs / "vfio-dev")
        return f"/dev/vfio/devices/{node}"


def rig_dev(kind: str) -> Dev:
    """The rig's device of the given kind (the inner init created them)."""
    if kind == "edu":
        bdf = os.environ["PYVMM_RIG_EDU"]
        return Dev(kind, bdf, Path("/sys/bus/pci/devices") / bdf)
    uuid = os.environ["PYVMM_RIG_MTTY_KVM" if kind == "mtty_kvm" else "PYVMM_RIG_MTTY"]
    return Dev(kind, uuid, Path("/sys/bus/mdev/devices") / uuid)


TRACING = Path("/sys/kernel/tracing")
KVMGET = re.compile(r"pyvmm_kvmget: \(.*?\) device=(0x[0-9a-f]+) kvm=(0x[0-9a-f]+)")


class Probe:
    """kprobes on vfio_device_get_kvm_safe (records its kvm argument at every
    open) and kvm_get_kvm_safe (runs only when a real kvm was handed over)."""

    def clear(self) -> None:
        (TRACING / "trace").write_text("")

    def read(self) -> tuple[list[int], int]:
        """(kvm pointers seen by vfio_device_get_kvm_safe, kvm_get_kvm_safe hits)."""
        text = (TRACING / "trace").read_text()
        kvms = [int(m.group(2), 16) for m in KVMGET.finditer(text)]
        return kvms, text.count("pyvmm_kvmsafe:")


def kprobe_event(line: str) -> None:
    """Append one definition to kprobe_events.

    Not open(..., "a"): Python seeks to the end of a file opened for append,
    and tracefs refuses that seek with EINVAL.
    """
    fd = os.open(TRACING / "kprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def probe() -> Iterator[Probe]:
    kprobe_event("p:pyvmm/pyvmm_kvmget vfio_device_get_kvm_safe device=%di kvm=%si\n")
    kprobe_event("p:pyvmm/pyvmm_kvmsafe kvm_get_kvm_safe kvm=%di\n")
    (TRACING / "events/pyvmm/enable").write_text("1")
    try:
        yield Probe()
    finally:
        (TRACING / "events/pyvmm/enable").write_text("0")
        kprobe_event("-:pyvmm/pyvmm_kvmget\n")
        kprobe_event("-:pyvmm/pyvmm_kvmsafe\n")


@dataclass
class Fds:
    """File descriptors to close at the end of a test, last opened first."""

    fds: list[int] = field(default_factory=list)

    def open(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


@pytest.fixture
def fds() -> Iterator[Fds]:
    f = Fds()
    try:
        yield f
    finally:
        f.close()


def kvm_vfio_device(fds: Fds) -> int:
    """A VM and its KVM-VFIO device; returns the device's fd."""
    kvm = fds.open("/dev/kvm")
    vm = fds.keep(ioctl(kvm, KVM_CREATE_VM, 0))
    cd = buf("III", KVM_DEV_TYPE_VFIO, 0, 0)
    ioctl(vm, KVM_CREATE_DEVICE, cd)
    return fds.keep(struct.unpack_from("III", cd.raw)[1])


def file_add(kvfio: int, fd: int) -> None:
    """KVM_DEV_VFIO_FILE_ADD: register a VFIO group or device file with the VM."""
    fdv = ctypes.c_int32(fd)
    attr = buf("IIQQ", 0, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD, ctypes.addressof(fdv))
    ioctl(kvfio, KVM_SET_DEVICE_ATTR, attr)


def open_group_path(dev: Dev, fds: Fds, kvfio: int, register_first: bool, probe: Probe) -> int:
    """Legacy container/group path up to VFIO_GROUP_GET_DEVICE_FD (the open)."""
    container = fds.open("/dev/vfio/vfio")
    group = fds.open(f"/dev/vfio/{dev.group}")
    st = buf("II", 8, 0)
    ioctl(group, VFIO_GROUP_GET_STATUS, st)
    assert struct.unpack("II", st.raw)[1] & VFIO_GROUP_FLAGS_VIABLE
    assert ioctl(container, VFIO_GET_API_VERSION) == 0
    assert ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1
    ioctl(group, VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container))
    ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
    if register_first:
        file_add(kvfio, group)
    probe.clear()
    try:
        return fds.keep(
            ioctl(group, VFIO_GROUP_GET_DEVICE_FD, ctypes.create_string_buffer(dev.name.encode()))
        )
    finally:
        if not register_first:
            file_add(kvfio, group)  # accepted, but the device was opened without kvm


def open_cdev_path(dev: Dev, fds: Fds, kvfio: int, register_first: bool, probe: Probe) -> int:
    """Device cdev + iommufd path: VFIO_DEVICE_BIND_IOMMUFD is the open."""
    cdev = fds.open(dev.cdev)
    if register_first:
        file_add(kvfio, cdev)
    iommufd = fds.open("/dev/iommu")
    probe.clear()
    try:
        ioctl(cdev, VFIO_DEVICE_BIND_IOMMUFD, buf("IIiI", 16, 0, iommufd, 0))
    finally:
        if not register_first:
            file_add(kvfio, cdev)
    ioas = buf("III", 12, 0, 0)
    ioctl(iommufd, IOMMU_IOAS_ALLOC, ioas)
    ioctl(cdev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, buf("III", 12, 0, struct.unpack("III", ioas.raw)[2]))
    return cdev


def region_read32(devfd: int, index: int, off: int) -> int:
    """Read 32 bits at ``off`` of VFIO region ``index`` (pread on the device fd)."""
    info = buf("IIIIQQ", 32, 0, index, 0, 0, 0)
    ioctl(devfd, VFIO_DEVICE_GET_REGION_INFO, info)
    _, _, _, _, size, offset = struct.unpack("IIIIQQ", info.raw)
    assert size >= off + 4
    return struct.unpack("<I", os.pread(devfd, 4, offset + off))[0]


def test_rig_is_ready() -> None:
    """What the issue promises inside: nodes, kvm_amd, tracefs, kprobe events."""
    for node in ("/dev/kvm", "/dev/iommu", "/dev/vfio/vfio"):
        assert os.path.exists(node), node
    for kind in ("edu", "mtty", "mtty_kvm"):
        d = rig_dev(kind)
        assert os.path.exists(f"/dev/vfio/{d.group}") and os.path.exists(d.cdev), kind
    assert os.path.realpath(f"/sys/bus/pci/devices/{os.environ['PYVMM_RIG_EDU']}/driver").endswith(
        "/vfio-pci"
    )
    assert Path("/sys/module/kvm_amd").exists()
    assert (TRACING / "kprobe_events").exists()


@pytest.mark.parametrize("path", ["group", "cdev"])
@pytest.mark.parametrize("kind", ["edu", "mtty", "mtty_kvm"])
@pytest.mark.parametrize("order", ["register_then_open", "open_then_register"])
def test_kvm_reaches_device_only_if_registered_before_open(
    path: str, kind: str, order: str, fds: Fds, probe: Probe
) -> None:
    dev = rig_dev(kind)
    register_first = order == "register_then_open"
    kvfio = kvm_vfio_device(fds)
    opener = open_group_path if path == "group" else open_cdev_path
    if kind == "mtty_kvm" and not register_first:
        # The stand-in for kvmgt/vfio-ap refuses to open without kvm.
        with pytest.raises(OSError) as exc:
            opener(dev, fds, kvfio, register_first, probe)
        assert exc.value.errno == errno.EINVAL
        devfd = None
    else:
        devfd = opener(dev, fds, kvfio, register_first, probe)
    kvms, safe_hits = probe.read()
    assert kvms, "the kprobe on vfio_device_get_kvm_safe did not fire at open"
    if register_first:
        assert all(kvms), f"open got a NULL kvm although FILE_ADD came first: {kvms}"
        assert safe_hits >= 1
    else:
        assert not any(kvms), f"open got a kvm without FILE_ADD before it: {kvms}"
        assert safe_hits == 0
    if devfd is not None:  # the opened device works, whichever order
        vendor_device = region_read32(devfd, VFIO_PCI_CONFIG_REGION_INDEX, 0)
        assert vendor_device not in (0, 0xFFFFFFFF)
        if kind == "edu":
            assert vendor_device == 0x11E81234
            assert region_read32(devfd, VFIO_PCI_BAR0_REGION_INDEX, 0) == EDU_ID
