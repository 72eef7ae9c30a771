"""pyvmm: a minimal VMM in Python on Linux KVM, for booting test guests with assigned devices.

The layers, bottom up: ``_native`` (cffi bindings and the C run loop), ``ioctl``, ``kvm``,
``vfio`` and ``iommufd`` (ioctl wrappers), ``memory`` (guest RAM), ``loader`` and ``x86``
(boot), ``bus``, ``pci``, ``irq`` and ``devices``, ``hostdev`` and ``assign`` (host devices
through VFIO), ``vcpu`` and ``machine`` (the builder and run loop), then ``cli``,
``hostcli`` and ``testing``.
"""

from pyvmm.errors import ExitStatus, PyvmmError
from pyvmm.guests import guest_path
from pyvmm.machine import Machine
from pyvmm.result import RunResult
from pyvmm.x86 import CpuMode

__all__ = ["CpuMode", "ExitStatus", "Machine", "PyvmmError", "RunResult", "guest_path"]
