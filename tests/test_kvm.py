"""The thin KVM wrappers against the real /dev/kvm: each ioctl works, or fails by name."""

from __future__ import annotations

import errno
import os

import pytest

from pyvmm._native import lib
from pyvmm.errors import KvmIoctlError
from pyvmm.kvm import Kvm

pytestmark = pytest.mark.usefixtures("kvm_required")


@pytest.fixture
def vm():
    with Kvm() as kvm, kvm.create_vm() as vm:
        yield vm


def test_system_queries():
    with Kvm() as kvm:
        assert kvm.api_version() == 12
        assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY) > 0
        assert kvm.vcpu_mmap_size() >= 4096
        cpuid = kvm.supported_cpuid()
        functions = {cpuid.entries[i].function for i in range(cpuid.nent)}
        assert {0, 1, 0x80000000} <= functions


def test_irqchip_pit_routing_irqfd_and_ioeventfd(vm):
    vm.create_irqchip()
    vm.create_pit2()
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    vm.set_gsi_routing(
        [
            {
                "gsi": 4,
                "type": lib.KVM_IRQ_ROUTING_IRQCHIP,
                "u": {"irqchip": {"irqchip": lib.KVM_IRQCHIP_IOAPIC, "pin": 4}},
            },
            {
                "gsi": 24,
                "type": lib.KVM_IRQ_ROUTING_MSI,
                "u": {"msi": {"address_lo": 0xFEE00000, "data": 0x41}},
            },
        ]
    )
    trigger, resample = os.eventfd(0), os.eventfd(0)
    notify = os.eventfd(0)
    try:
        vm.irqfd(trigger, 24)
        vm.irqfd_deassign(trigger, 24)
        vm.irqfd(trigger, 4, resample_fd=resample)
        vm.ioeventfd(notify, 0xD000_0000, 4, datamatch=1)
        vm.ioeventfd(notify, 0x510, 2, pio=True)
        vm.ioeventfd(notify, 0x510, 2, pio=True, deassign=True)
        # An MSI needs a vCPU to go to: APIC ID 0 is vCPU 0.
        with vm.create_vcpu(0):
            assert vm.signal_msi(0xFEE00000, 0x41) >= 0
    finally:
        for fd in (trigger, resample, notify):
            os.close(fd)


def test_vcpu_state_round_trips(vm):
    with vm.create_vcpu(0) as vcpu:
        regs = vcpu.get_regs()
        regs.rip, regs.rax = 0x1234, 0xDEADBEEF
        vcpu.set_regs(regs)
        again = vcpu.get_regs()
        assert (again.rip, again.rax) == (0x1234, 0xDEADBEEF)
        sregs = vcpu.get_sregs()
        vcpu.set_sregs(sregs)
        fpu = vcpu.get_fpu()
        fpu.mxcsr = 0x1F80
        vcpu.set_fpu(fpu)
        vcpu.set_msrs({0x2FF: 0xC06})
        assert vcpu.get_msrs([0x2FF]) == {0x2FF: 0xC06}
        with Kvm() as kvm:
            vcpu.set_cpuid(kvm.supported_cpuid())
        assert vcpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE
        assert vcpu.run.exit_reason == 0


def test_kvm_vfio_device(vm):
    try:
        device = vm.create_device(lib.KVM_DEV_TYPE_VFIO)
    except KvmIoctlError as error:
        pytest.skip(f"this kernel has no KVM-VFIO device: {error.message}")
    with device:
        assert device.has_attr(lib.KVM_DEV_VFIO_FILE, lib.KVM_DEV_VFIO_FILE_ADD)


def test_failing_ioctl_names_itself_and_the_errno(vm):
    with pytest.raises(KvmIoctlError) as raised:
        vm.set_user_memory_region(0, 0x1001, 4096, 0)  # unaligned guest address
    assert raised.value.errno == errno.EINVAL
    assert raised.value.message.startswith("KVM_SET_USER_MEMORY_REGION failed: EINVAL")
