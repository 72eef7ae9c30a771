"""Thin typed wrappers over the KVM ioctls: /dev/kvm (Kvm), a VM (Vm), a vCPU (Vcpu).

Each method is one ioctl; structures are cffi cdata of the layouts in csrc/kvm_uapi.h.
A failing ioctl raises KvmIoctlError naming the ioctl and the errno. Nothing here knows
about guests, boot modes or devices: those layers sit above.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterable, Mapping
from typing import Any

from pyvmm._native import ffi, lib
from pyvmm.errors import DeviceAssignmentError, KvmIoctlError, KvmUnavailableError
from pyvmm.ioctl import Cdata, FileHandle, ioctl_result, trace
from pyvmm.ioctl import ioctl as _ioctl
from pyvmm.ioctl import ioctl_value as _ioctl_value

_DEVICE_TYPES = {lib.KVM_DEV_TYPE_VFIO: "KVM_DEV_TYPE_VFIO"}


class Kvm(FileHandle):
    """The system handle /dev/kvm: API version, capabilities, supported CPUID, VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) "
                "or run on a machine with virtualization enabled"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"permission denied opening {path}: add your user to the 'kvm' group or run as root"
            ) from None
        except OSError as error:
            raise KvmUnavailableError(f"cannot open {path}: {error.strerror}") from None
        super().__init__(fd)
        try:
            version = self.api_version()
        except KvmIoctlError:
            self.close()
            raise KvmUnavailableError(
                f"{path} is not a KVM device (KVM_GET_API_VERSION failed): point at /dev/kvm"
            ) from None
        if version != lib.KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}, pyvmm needs {lib.KVM_API_VERSION}"
            )

    def api_version(self) -> int:
        """Return KVM_GET_API_VERSION (12 on every kernel since 2.6.22)."""
        return _ioctl_value(self.fd, lib.KVM_GET_API_VERSION, "KVM_GET_API_VERSION")

    def check_extension(self, capability: int) -> int:
        """Return KVM_CHECK_EXTENSION for a KVM_CAP_* value: 0 when unsupported."""
        return _ioctl_value(self.fd, lib.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", capability)

    def vcpu_mmap_size(self) -> int:
        """Return the size of the kvm_run area each vCPU fd maps."""
        return _ioctl_value(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> Cdata:
        """Return KVM_GET_SUPPORTED_CPUID as a struct kvm_cpuid2 cdata, grown until it fits."""
        count = 64
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": count, "entries": count})
            result = ioctl_result(
                self.fd,
                lib.KVM_GET_SUPPORTED_CPUID,
                "KVM_GET_SUPPORTED_CPUID",
                cpuid,
                f"nent={count}",
            )
            if result == -errno.E2BIG and count < 4096:
                count *= 2
                continue
            if result < 0:
                raise KvmIoctlError("KVM_GET_SUPPORTED_CPUID", -result)
            return cpuid

    def create_vm(self) -> Vm:
        """Create a VM (KVM_CREATE_VM, default machine type)."""
        return Vm(self, _ioctl_value(self.fd, lib.KVM_CREATE_VM, "KVM_CREATE_VM", 0))


class Vm(FileHandle):
    """A VM fd: memory slots, irqchip and PIT, interrupt routing, eventfds, devices, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        """Map host memory at a guest-physical address (size 0 deletes the slot)."""
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_phys_addr,
                "memory_size": size,
                "userspace_addr": host_address,
            },
        )
        _ioctl(
            self.fd,
            lib.KVM_SET_USER_MEMORY_REGION,
            "KVM_SET_USER_MEMORY_REGION",
            region,
            lambda: (
                f"slot={slot}, guest_phys_addr={guest_phys_addr:#x}, memory_size={size:#x}, "
                f"userspace_addr={host_address:#x}"
            ),
        )

    def set_tss_addr(self, address: int) -> None:
        """Place the three pages Intel VMX needs for real-mode emulation (no-op on AMD)."""
        _ioctl_value(self.fd, lib.KVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", address)

    def set_identity_map_addr(self, address: int) -> None:
        """Place the one page Intel VMX needs for its identity map (no-op on AMD)."""
        value = ffi.new("uint64_t *", address)
        _ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR", value)

    def create_irqchip(self) -> None:
        """Create the in-kernel PIC, IOAPIC and local APICs (before any vCPU)."""
        _ioctl_value(self.fd, lib.KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """Create the in-kernel i8254 PIT, with port 0x61 (speaker gate and channel 2 output).

        KVM_PIT_SPEAKER_DUMMY is what makes KVM serve port 0x61 at all (a "dummy" speaker: the
        gate and OUT2 bits work, no sound): kernels calibrate the TSC against PIT channel 2
        by polling OUT2 there.
        """
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        _ioctl(self.fd, lib.KVM_CREATE_PIT2, "KVM_CREATE_PIT2", config)

    def set_pic_elcr(self, irqs: Iterable[int]) -> None:
        """Mark IRQs level-triggered in the in-kernel 8259s' ELCR (ports 0x4D0/0x4D1).

        KVM serves the ELCR ports itself; PC firmware sets them for the IRQs it routes PCI
        interrupts to, before the OS starts, and this is pyvmm's way to do the same.
        """
        for chip, first in ((lib.KVM_IRQCHIP_PIC_MASTER, 0), (lib.KVM_IRQCHIP_PIC_SLAVE, 8)):
            state = ffi.new("struct kvm_irqchip *", {"chip_id": chip})
            _ioctl(self.fd, lib.KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP", state, f"chip={chip}")
            bits = sum(1 << (irq - first) for irq in irqs if first <= irq < first + 8)
            state.chip.pic.elcr = bits & state.chip.pic.elcr_mask
            detail = f"chip={chip}, elcr={state.chip.pic.elcr:#04x}"
            _ioctl(self.fd, lib.KVM_SET_IRQCHIP, "KVM_SET_IRQCHIP", state, detail)

    def pic_elcr(self) -> int:
        """The 8259s' ELCR as one 16-bit value (bit n: IRQ n is level-triggered)."""
        value = 0
        for chip, first in ((lib.KVM_IRQCHIP_PIC_MASTER, 0), (lib.KVM_IRQCHIP_PIC_SLAVE, 8)):
            state = ffi.new("struct kvm_irqchip *", {"chip_id": chip})
            _ioctl(self.fd, lib.KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP", state, f"chip={chip}")
            value |= state.chip.pic.elcr << first
        return value

    def set_pit_reinject(self, reinject: bool) -> None:
        """Choose whether the PIT delivers the ticks a guest missed (KVM's default) or drops them.

        QEMU's `-global kvm-pit.lost_tick_policy=discard` turns reinjection off, `delay` keeps it.
        """
        control = ffi.new("struct kvm_reinject_control *", {"pit_reinject": int(reinject)})
        _ioctl(self.fd, lib.KVM_REINJECT_CONTROL, "KVM_REINJECT_CONTROL", control)

    def irq_line(self, irq: int, level: int) -> None:
        """Drive an in-kernel irqchip input (GSI) high or low."""
        line = ffi.new("struct kvm_irq_level *")
        line.irq = irq
        line.level = level
        _ioctl(self.fd, lib.KVM_IRQ_LINE, "KVM_IRQ_LINE", line)

    def set_gsi_routing(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Replace the GSI routing table; each entry is a struct kvm_irq_routing_entry dict."""
        entries = list(entries)
        routing = ffi.new("struct kvm_irq_routing *", {"nr": len(entries), "entries": len(entries)})
        for index, entry in enumerate(entries):
            target = routing.entries[index]
            target.gsi = entry["gsi"]
            target.type = entry["type"]
            for union_member, fields in entry.get("u", {}).items():
                for field, value in fields.items():
                    setattr(getattr(target.u, union_member), field, value)
        _ioctl(
            self.fd,
            lib.KVM_SET_GSI_ROUTING,
            "KVM_SET_GSI_ROUTING",
            routing,
            lambda: f"nr={len(entries)}, msi gsis={[e['gsi'] for e in entries if e['type'] == 2]}",
        )

    def irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Inject GSI whenever eventfd is signalled; with resample_fd, as a level interrupt."""
        request = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi})
        if resample_fd is not None:
            request.flags = lib.KVM_IRQFD_FLAG_RESAMPLE
            request.resamplefd = resample_fd
        _ioctl(
            self.fd,
            lib.KVM_IRQFD,
            "KVM_IRQFD",
            request,
            lambda: (
                f"fd={eventfd}, gsi={gsi}"
                + (f", KVM_IRQFD_FLAG_RESAMPLE, resamplefd={resample_fd}" if resample_fd else "")
            ),
        )

    def irqfd_deassign(self, eventfd: int, gsi: int) -> None:
        """Undo irqfd() for this eventfd and GSI."""
        request = ffi.new(
            "struct kvm_irqfd *",
            {"fd": eventfd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN},
        )
        _ioctl(
            self.fd,
            lib.KVM_IRQFD,
            "KVM_IRQFD",
            request,
            f"fd={eventfd}, gsi={gsi}, KVM_IRQFD_FLAG_DEASSIGN",
        )

    def ioeventfd(
        self,
        eventfd: int,
        address: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        """Signal eventfd on a guest write to address, inside KVM, with no exit to userspace."""
        flags = lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        request = ffi.new(
            "struct kvm_ioeventfd *",
            {
                "datamatch": datamatch or 0,
                "addr": address,
                "len": length,
                "fd": eventfd,
                "flags": flags,
            },
        )
        _ioctl(self.fd, lib.KVM_IOEVENTFD, "KVM_IOEVENTFD", request)

    def signal_msi(self, address: int, data: int) -> int:
        """Inject one MSI; returns >0 when delivered, 0 when the guest blocked it."""
        msi = ffi.new(
            "struct kvm_msi *",
            {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data},
        )
        return _ioctl(self.fd, lib.KVM_SIGNAL_MSI, "KVM_SIGNAL_MSI", msi)

    def create_device(self, device_type: int) -> KvmDevice:
        """Create an in-kernel device (KVM_CREATE_DEVICE), e.g. KVM_DEV_TYPE_VFIO."""
        request = ffi.new("struct kvm_create_device *", {"type": device_type})
        _ioctl(
            self.fd,
            lib.KVM_CREATE_DEVICE,
            "KVM_CREATE_DEVICE",
            request,
            lambda: f"type={_DEVICE_TYPES.get(device_type, device_type)}, out fd={request.fd}",
        )
        return KvmDevice(
            request.fd, _DEVICE_TYPES.get(device_type, "").replace("KVM_DEV_TYPE_", "kvm-").lower()
        )

    def create_vcpu(self, index: int) -> Vcpu:
        """Create vCPU number index and map its kvm_run area."""
        fd = _ioctl_value(self.fd, lib.KVM_CREATE_VCPU, "KVM_CREATE_VCPU", index)
        trace(f"vCPU {index} is fd {fd}")
        try:
            return Vcpu(fd, index, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)  # the vCPU was never handed out: nobody else would close it
            raise


class KvmDevice(FileHandle):
    """A device created with KVM_CREATE_DEVICE, programmed through device attributes."""

    def set_attr(self, group: int, attr: int, address: int = 0, detail: str = "") -> None:
        """KVM_SET_DEVICE_ATTR; address points to the attribute's argument.

        Refused for a KVM-VFIO device's KVM_DEV_VFIO_FILE group: FILE_ADD and FILE_DEL go
        through pyvmm.vfio.KvmVfioDevice, which keeps them in the order the devices need.
        """
        if self.path == "kvm-vfio" and group == lib.KVM_DEV_VFIO_FILE:
            raise DeviceAssignmentError(
                "KVM_DEV_VFIO_FILE_ADD/_DEL are not set directly: register a VFIO file with "
                "KvmVfioDevice.add_file() and drop it with the registration's close()"
            )
        self._set_attr(group, attr, address, detail)

    def _set_attr(self, group: int, attr: int, address: int, detail: str = "") -> None:
        # Unchecked: for KvmVfioDevice, the one caller allowed the VFIO file attributes.
        request = ffi.new(
            "struct kvm_device_attr *", {"group": group, "attr": attr, "addr": address}
        )
        _ioctl(
            self.fd,
            lib.KVM_SET_DEVICE_ATTR,
            "KVM_SET_DEVICE_ATTR",
            request,
            detail or f"group={group}, attr={attr}, addr={address:#x}",
        )

    def has_attr(self, group: int, attr: int) -> bool:
        """KVM_HAS_DEVICE_ATTR: whether the device knows this attribute."""
        request = ffi.new("struct kvm_device_attr *", {"group": group, "attr": attr})
        detail = f"group={group}, attr={attr}"
        return (
            ioctl_result(self.fd, lib.KVM_HAS_DEVICE_ATTR, "KVM_HAS_DEVICE_ATTR", request, detail)
            == 0
        )


class Vcpu(FileHandle):
    """A vCPU fd and its mmap'd struct kvm_run."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.index = index
        self._mapping = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buffer = ffi.from_buffer(self._mapping)
        #: The shared kvm_run area, as struct kvm_run *.
        self.run = ffi.cast("struct kvm_run *", self._run_buffer)
        self.mmap_size = mmap_size

    def close(self) -> None:
        """Unmap kvm_run and close the vCPU fd."""
        if self._mapping is not None:
            self.run = None
            ffi.release(self._run_buffer)
            self._mapping.close()
            self._mapping = None
        super().close()

    def _get(self, request: int, name: str, ctype: str) -> Cdata:
        value = ffi.new(ctype)
        _ioctl(self.fd, request, name, value)
        return value

    def get_regs(self) -> Cdata:
        """Return the general-purpose registers (struct kvm_regs *)."""
        return self._get(lib.KVM_GET_REGS, "KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs: Cdata) -> None:
        """Set the general-purpose registers."""
        _ioctl(self.fd, lib.KVM_SET_REGS, "KVM_SET_REGS", regs)

    def get_sregs(self) -> Cdata:
        """Return segments, descriptor tables, control registers and EFER."""
        return self._get(lib.KVM_GET_SREGS, "KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs: Cdata) -> None:
        """Set segments, descriptor tables, control registers and EFER."""
        _ioctl(self.fd, lib.KVM_SET_SREGS, "KVM_SET_SREGS", sregs)

    def get_fpu(self) -> Cdata:
        """Return the x87/SSE state (struct kvm_fpu *)."""
        return self._get(lib.KVM_GET_FPU, "KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu: Cdata) -> None:
        """Set the x87/SSE state."""
        _ioctl(self.fd, lib.KVM_SET_FPU, "KVM_SET_FPU", fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; raises if KVM returns fewer than asked for."""
        indices = list(indices)
        msrs = self._msrs({index: 0 for index in indices})
        count = _ioctl(self.fd, lib.KVM_GET_MSRS, "KVM_GET_MSRS", msrs)
        if count != len(indices):
            raise KvmIoctlError("KVM_GET_MSRS", errno.EINVAL, f"MSR {indices[count]:#x}")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """Write MSRs; raises naming the first MSR KVM refused."""
        msrs = self._msrs(values)
        count = _ioctl(self.fd, lib.KVM_SET_MSRS, "KVM_SET_MSRS", msrs)
        if count != len(values):
            raise KvmIoctlError("KVM_SET_MSRS", errno.EINVAL, f"MSR {list(values)[count]:#x}")

    @staticmethod
    def _msrs(values: Mapping[int, int]) -> Cdata:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        return msrs

    def set_cpuid(self, cpuid: Cdata) -> None:
        """Set the CPUID the guest sees (struct kvm_cpuid2 *)."""
        _ioctl(self.fd, lib.KVM_SET_CPUID2, "KVM_SET_CPUID2", cpuid)

    def get_mp_state(self) -> int:
        """Return the multiprocessing state (KVM_MP_STATE_*)."""
        state = self._get(lib.KVM_GET_MP_STATE, "KVM_GET_MP_STATE", "struct kvm_mp_state *")
        return state.mp_state

    def set_mp_state(self, state: int) -> None:
        """Set the multiprocessing state, e.g. RUNNABLE for an AP without INIT/SIPI."""
        value = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        _ioctl(self.fd, lib.KVM_SET_MP_STATE, "KVM_SET_MP_STATE", value)
