"""Errors and exit statuses shared by every layer of pyvmm.

A guest that ends through isa-debug-exit always exits with an odd status, (v << 1) | 1, and
a clean power-off exits with 0. So every failure of pyvmm itself has an even status: a test
harness can always tell "the guest said so" from "the VMM stopped it".
"""

from __future__ import annotations

import enum
import errno
import os


class ExitStatus(enum.IntEnum):
    """Process exit statuses of `pyvmm run` for each way a run can fail."""

    OK = 0
    USAGE = 2  #: bad command line (argparse's own status)
    BAD_IMAGE = 4  #: the guest image is missing, malformed, foreign or does not fit
    NO_KVM = 6  #: /dev/kvm is missing, not permitted, or too old
    TRIPLE_FAULT = 8  #: the guest triple-faulted (KVM_EXIT_SHUTDOWN)
    TIMEOUT = 10  #: --timeout expired before the guest ended
    INTERNAL_ERROR = 12  #: KVM could not run the guest (entry failure, internal error, ioctl)
    UNCLAIMED_ACCESS = 14  #: an unclaimed port or MMIO access with --fail-on-unclaimed
    HALTED_FOREVER = 16  #: HLT with interrupts on and nothing that could wake the vCPU
    SIGNALLED = 18  #: stopped by SIGINT or SIGTERM
    SYSTEM_EVENT = 20  #: the guest asked KVM for a reset, shutdown or crash event
    DEVICE_ERROR = 22  #: a device backend failed (a forwarded fd, a device handler)
    DEVICE_NOT_FOUND = 24  #: --device names no PCI device, sysfs path or mdev on this host
    DEVICE_NOT_BOUND = 26  #: the device is not bound to vfio-pci (or is not a VFIO mdev)
    GROUP_NOT_VIABLE = 28  #: another device in the IOMMU group is bound to a host driver
    DEVICE_PERMISSION = 30  #: no permission on /dev/vfio/* or /dev/iommu
    DEVICE_BUSY = 32  #: the device or its group is already in use by another process
    MEMLOCK_LIMIT = 34  #: RLIMIT_MEMLOCK is too low to pin guest RAM for DMA
    NO_VFIO = 36  #: the host kernel lacks VFIO (or iommufd and the device cdev for --vfio cdev)
    REBOOT = 38  #: the guest rebooted the machine (reset control register, port 0xCF9)
    INTERNAL_BUG = 40  #: pyvmm itself failed unexpectedly (a bug: please report it)


class PyvmmError(Exception):
    """A failure with a one-line message meant for the user, and the exit status it maps to."""

    exit_status: ExitStatus = ExitStatus.INTERNAL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KvmUnavailableError(PyvmmError):
    """/dev/kvm cannot be used: missing, not permitted, or an unexpected API version."""

    exit_status = ExitStatus.NO_KVM


class GuestImageError(PyvmmError):
    """The guest image cannot be loaded: missing, malformed, foreign, or does not fit."""

    exit_status = ExitStatus.BAD_IMAGE


class ConfigurationError(PyvmmError):
    """The machine asked for cannot be built (bad memory size, too many vCPUs, overlaps)."""

    exit_status = ExitStatus.USAGE


class KvmIoctlError(PyvmmError):
    """An ioctl failed; the message names the ioctl and the errno."""

    exit_status = ExitStatus.INTERNAL_ERROR

    def __init__(self, ioctl: str, error: int, context: str = "") -> None:
        name = errno.errorcode.get(error, str(error))
        detail = f" ({context})" if context else ""
        super().__init__(f"{ioctl} failed: {name}: {os.strerror(error)}{detail}")
        self.ioctl = ioctl
        self.errno = error


class DeviceHandlerError(PyvmmError):
    """A device backend (a Python handler of a port or MMIO range) raised; __cause__ is why."""

    exit_status = ExitStatus.DEVICE_ERROR


class DeviceAssignmentError(PyvmmError):
    """A device cannot be assigned; the subclass's exit status says why, the message the fix."""

    exit_status = ExitStatus.DEVICE_ERROR


class DeviceNotFoundError(DeviceAssignmentError):
    """No host device matches what --device named."""

    exit_status = ExitStatus.DEVICE_NOT_FOUND


class DeviceNotBoundError(DeviceAssignmentError):
    """The device is bound to a host driver (or none) instead of vfio-pci."""

    exit_status = ExitStatus.DEVICE_NOT_BOUND


class GroupNotViableError(DeviceAssignmentError):
    """The device's IOMMU group holds a device still bound to a host driver."""

    exit_status = ExitStatus.GROUP_NOT_VIABLE


class DevicePermissionError(DeviceAssignmentError):
    """The VFIO or iommufd node cannot be opened by this user."""

    exit_status = ExitStatus.DEVICE_PERMISSION


class DeviceBusyError(DeviceAssignmentError):
    """Another process (or this one) already holds the device or its group."""

    exit_status = ExitStatus.DEVICE_BUSY


class MemlockLimitError(DeviceAssignmentError):
    """RLIMIT_MEMLOCK is below what pinning guest RAM for device DMA needs."""

    exit_status = ExitStatus.MEMLOCK_LIMIT


class VfioUnavailableError(DeviceAssignmentError):
    """The kernel lacks the VFIO path asked for (no /dev/vfio/vfio, no /dev/iommu, no cdev)."""

    exit_status = ExitStatus.NO_VFIO
