"""The one place pyvmm's Python layers issue ioctls from, and the --trace that shows them.

kvm.py, vfio.py and iommufd.py wrap one ioctl per method on top of ``ioctl()`` here. A
failing ioctl raises the wrapper's error class naming the ioctl and the errno. With tracing
on (``pyvmm run --trace``, or ``trace_to(sys.stderr)``), every ioctl, and every open and close
of a device node, prints one line, by its uAPI name, with decoded arguments and the result:

    trace: KVM_SET_DEVICE_ATTR(fd 5 kvm-vfio, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD,
           fd 7 /dev/vfio/2) = 0

The vCPU exit loop runs in C and is never traced one exit at a time (``--stats`` counts it).

A test switch, ``PYVMM_FAULT_INJECT``, makes one traced call fail as the kernel would, without
issuing it: ``7:EIO`` fails the 7th traced ioctl or device-node open (counted from 1, as the
trace lines are), ``VFIO_IOMMU_MAP_DMA:ENOMEM`` the first ioctl of that name, ``open:EBUSY``
the first open of a device node. The caller sees exactly the error a real failure raises;
the trace line ends ``[injected]``. Off (unset), it costs one global check per call.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, TextIO

from pyvmm._native import ffi, lib
from pyvmm.errors import ConfigurationError, KvmIoctlError, PyvmmError

Cdata = Any  # cffi cdata; cffi exposes no static type for it
#: Arguments as a string, or a callable that makes one only when tracing is on.
Detail = str | Callable[[], str]

_trace_stream: TextIO | None = None


class _FaultPlan:
    """Which traced call PYVMM_FAULT_INJECT fails, and with which errno; fires once."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.calls = 0
        self.fired = False
        self.problem: str | None = None
        self.position: int | None = None
        self.name = ""
        self.errno = 0
        target, _, code = spec.rpartition(":")
        error = getattr(errno, code, None) if code.isupper() else None
        if not target or not isinstance(error, int):
            self.problem = f"PYVMM_FAULT_INJECT={spec}: use N:ERRNO or IOCTL_NAME:ERRNO (7:EIO)"
            return
        self.errno = error
        if target.isdigit() and int(target) > 0:
            self.position = int(target)
        else:
            self.name = target

    def fault(self, name: str) -> int:
        """The errno to fail this call with, or 0 to issue it."""
        if self.problem is not None:
            raise ConfigurationError(self.problem)
        self.calls += 1
        if self.fired:
            return 0
        if self.calls == self.position or (self.position is None and name == self.name):
            self.fired = True
            return self.errno
        return 0


def _fault_plan_from_env() -> _FaultPlan | None:
    spec = os.environ.get("PYVMM_FAULT_INJECT", "")
    return _FaultPlan(spec) if spec else None


_fault_plan: _FaultPlan | None = _fault_plan_from_env()


def inject_fault(spec: str | None) -> None:
    """Arm PYVMM_FAULT_INJECT's switch from Python (tests); None disarms it."""
    global _fault_plan
    _fault_plan = _FaultPlan(spec) if spec else None


def trace_to(stream: TextIO | None) -> None:
    """Print every ioctl and device open/close to stream from now on (None: stop)."""
    global _trace_stream
    _trace_stream = stream


def tracing() -> bool:
    """Whether --trace is on."""
    return _trace_stream is not None


def trace(line: str) -> None:
    """Print one trace line if tracing is on."""
    if _trace_stream is not None:
        _trace_stream.write(f"trace: {line}\n")
        _trace_stream.flush()


def _traced(name: str, detail: Detail, result: int, injected: bool = False) -> None:
    if _trace_stream is None:
        return
    text = detail() if callable(detail) else detail
    outcome = str(result) if result >= 0 else errno.errorcode.get(-result, str(-result))
    trace(f"{name}({text}) = {outcome}{' [injected]' if injected else ''}")


def _injected(name: str, detail: Detail) -> int:
    """-errno when PYVMM_FAULT_INJECT fails this call (traced as the real failure), else 0."""
    code = _fault_plan.fault(name) if _fault_plan is not None else 0
    if code:
        _traced(name, detail, -code, injected=True)
    return -code


def ioctl(
    fd: int,
    request: int,
    name: str,
    argument: Cdata = ffi.NULL,
    detail: Detail = "",
    error: type[PyvmmError] = KvmIoctlError,
) -> int:
    """ioctl(fd, request, pointer argument); raises error(name, errno) on failure."""
    if _fault_plan is None or not (result := _injected(name, detail)):
        result = lib.pyvmm_ioctl(fd, request, argument)
        _traced(name, detail, result)
    if result < 0:
        raise error(name, -result)
    return result


def ioctl_value(
    fd: int,
    request: int,
    name: str,
    value: int = 0,
    detail: Detail | None = None,
    error: type[PyvmmError] = KvmIoctlError,
) -> int:
    """ioctl(fd, request, integer argument); raises error(name, errno) on failure."""
    shown = str(value) if detail is None else detail
    if _fault_plan is None or not (result := _injected(name, shown)):
        result = lib.pyvmm_ioctl_value(fd, request, value)
        _traced(name, shown, result)
    if result < 0:
        raise error(name, -result)
    return result


def ioctl_result(fd: int, request: int, name: str, argument: Cdata, detail: Detail = "") -> int:
    """Like ioctl(), but return -errno instead of raising: for callers that branch on it."""
    if _fault_plan is None or not (result := _injected(name, detail)):
        result = lib.pyvmm_ioctl(fd, request, argument)
        _traced(name, detail, result)
    return result


class FileHandle:
    """Owns one file descriptor; closing twice is harmless. Traced when it names a node."""

    fd: int
    path: str = ""

    def __init__(self, fd: int, path: str = "") -> None:
        self.fd = fd
        self.path = path

    def close(self) -> None:
        """Close the file descriptor."""
        if self.fd >= 0:
            if self.path:
                trace(f"close({self.path}, fd {self.fd})")
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_node(path: str, flags: int = os.O_RDWR) -> int:
    """open(2) a device node with O_CLOEXEC, traced; raises OSError as open does."""
    injected = _fault_plan.fault("open") if _fault_plan is not None else 0
    try:
        if injected:
            raise OSError(injected, os.strerror(injected), path)
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as failure:
        code = errno.errorcode.get(failure.errno or 0, failure.errno)
        trace(f"open({path}) = {code}{' [injected]' if injected else ''}")
        raise
    trace(f"open({path}) = fd {fd}")
    return fd
