"""The order rule's refusals that need no VFIO device, on the host's real /dev/kvm.

Every refusal here must happen before any ioctl (checked on the --trace stream). The opening
side (FILE_ADD before every open, FILE_DEL after every close, on a real kernel VFIO stack)
is proven in the rig by tests/test_rig_order_stateful.py.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

from pyvmm._native import lib
from pyvmm.errors import DeviceAssignmentError, KvmIoctlError
from pyvmm.kvm import Kvm, Vm
from pyvmm.vfio import KvmVfioDevice, VfioGroup, VfioOrderError, VfioRegistration

pytestmark = pytest.mark.usefixtures("kvm_required")


@pytest.fixture
def vm() -> Iterator[Vm]:
    with Kvm() as kvm, kvm.create_vm() as vm:
        yield vm


@pytest.fixture
def kvm_vfio(vm: Vm) -> Iterator[KvmVfioDevice]:
    try:
        device = KvmVfioDevice(vm)
    except KvmIoctlError as error:
        pytest.skip(f"this kernel has no KVM-VFIO device: {error.message}")
    try:
        yield device
    finally:
        device.close()


@pytest.fixture
def not_vfio() -> Iterator[VfioGroup]:
    """/dev/null posing as a group file: only for refusals that precede every ioctl."""
    file = VfioGroup("/dev/null", os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
    try:
        yield file
    finally:
        file.close()


def test_a_registration_comes_only_from_add_file(not_vfio: VfioGroup) -> None:
    with pytest.raises(TypeError, match="add_file"):
        VfioRegistration(object(), None, not_vfio, 0)  # type: ignore[arg-type]


def test_the_kvm_vfio_file_attributes_are_not_public(
    kvm_vfio: KvmVfioDevice, vm: Vm, traced: io.StringIO
) -> None:
    assert not hasattr(kvm_vfio, "device")
    with pytest.raises(KvmIoctlError, match="EBUSY"):
        vm.create_device(lib.KVM_DEV_TYPE_VFIO)  # one per VM: no second, raw one
    # The raw KvmDevice underneath (private here) refuses them through its public set_attr.
    before = traced.getvalue()
    for attr in (lib.KVM_DEV_VFIO_FILE_ADD, lib.KVM_DEV_VFIO_FILE_DEL):
        with pytest.raises(DeviceAssignmentError, match="add_file"):
            kvm_vfio._device.set_attr(lib.KVM_DEV_VFIO_FILE, attr, 0)
    assert traced.getvalue() == before, "a refused attribute reached the kernel"


def test_a_closed_kvm_vfio_device_registers_nothing(
    kvm_vfio: KvmVfioDevice, not_vfio: VfioGroup, traced: io.StringIO
) -> None:
    kvm_vfio.close()
    kvm_vfio.close()  # twice is harmless
    before = traced.getvalue()
    with pytest.raises(VfioOrderError, match="KVM-VFIO device is closed"):
        kvm_vfio.add_file(not_vfio)
    assert traced.getvalue() == before


def test_a_closed_file_is_not_registered(
    kvm_vfio: KvmVfioDevice, not_vfio: VfioGroup, traced: io.StringIO
) -> None:
    not_vfio.close()
    before = traced.getvalue()
    with pytest.raises(VfioOrderError, match="/dev/null is closed"):
        kvm_vfio.add_file(not_vfio)
    assert traced.getvalue() == before


def test_a_file_the_kernel_refuses_leaves_no_registration(
    kvm_vfio: KvmVfioDevice, not_vfio: VfioGroup
) -> None:
    with pytest.raises(KvmIoctlError, match="KVM_SET_DEVICE_ATTR failed: EINVAL"):
        kvm_vfio.add_file(not_vfio)  # the kernel's own check: not a VFIO file
    assert kvm_vfio.registrations == ()
    with pytest.raises(KvmIoctlError, match="EINVAL"):
        kvm_vfio.add_file(not_vfio)  # and nothing half-registered refuses a retry
