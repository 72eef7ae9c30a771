"""The order rule by construction: no public path opens a VFIO device before FILE_ADD.

Pure-logic checks of the API's shape; the kernel side (the kvm pointer reaching the device
at open) is shown in the rig by tests/test_rig_assign.py and tests/test_rig_order.py.
"""

from __future__ import annotations

import inspect

import pytest

from pyvmm import vfio
from pyvmm.vfio import KvmVfioDevice, VfioDeviceCdev, VfioGroup, VfioRegistration

OPENING_IOCTLS = ("VFIO_GROUP_GET_DEVICE_FD", "VFIO_DEVICE_BIND_IOMMUFD")


def test_a_registration_comes_only_from_file_add() -> None:
    group = VfioGroup("/dev/vfio/0", -1)
    with pytest.raises(TypeError, match="add_file"):
        VfioRegistration(object(), None, group)  # type: ignore[arg-type]


def test_vfio_files_have_no_public_way_to_open_a_device() -> None:
    for cls in (VfioGroup, VfioDeviceCdev):
        public = [name for name in vars(cls) if not name.startswith("_")]
        for name in public:
            source = inspect.getsource(getattr(cls, name))
            assert not any(ioctl in source for ioctl in OPENING_IOCTLS), (cls, name)


def test_only_the_registration_issues_the_opening_ioctls() -> None:
    source = inspect.getsource(vfio)
    # The private helpers that issue them are called from one place: open_device().
    for helper in ("_get_device_fd(", "_bind_iommufd("):
        callers = [
            name
            for name, member in inspect.getmembers(VfioRegistration, inspect.isfunction)
            if helper in inspect.getsource(member)
        ]
        assert callers == ["open_device"], (helper, callers)
        assert source.count(f".{helper}") == 1, helper
    assert "FILE_ADD" in inspect.getsource(KvmVfioDevice.add_file)
