"""The one place pyvmm's Python layers issue ioctls from, and the --trace that shows them.

kvm.py, vfio.py and iommufd.py wrap one ioctl per method on top of ``ioctl()`` here. A
failing ioctl raises the wrapper's error class naming the ioctl and the errno. With tracing
on (``pyvmm run --trace``, or ``trace_to(sys.stderr)``), every ioctl, and every open and close
of a device node, prints one line, by its uAPI name, with decoded arguments and the result:

    trace: KVM_SET_DEVICE_ATTR(fd 5 kvm-vfio, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD,
           fd 7 /dev/vfio/2) = 0

The vCPU exit loop runs in C and is never traced one exit at a time (``--stats`` counts it).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, TextIO

from pyvmm._native import ffi, lib
from pyvmm.errors import KvmIoctlError, PyvmmError

Cdata = Any  # cffi cdata; cffi exposes no static type for it
#: Arguments as a string, or a callable that makes one only when tracing is on.
Detail = str | Callable[[], str]

_trace_stream: TextIO | None = None


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


def _traced(name: str, detail: Detail, result: int) -> None:
    if _trace_stream is None:
        return
    text = detail() if callable(detail) else detail
    outcome = str(result) if result >= 0 else errno.errorcode.get(-result, str(-result))
    trace(f"{name}({text}) = {outcome}")


def ioctl(
    fd: int,
    request: int,
    name: str,
    argument: Cdata = ffi.NULL,
    detail: Detail = "",
    error: type[PyvmmError] = KvmIoctlError,
) -> int:
    """ioctl(fd, request, pointer argument); raises error(name, errno) on failure."""
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
    result = lib.pyvmm_ioctl_value(fd, request, value)
    _traced(name, str(value) if detail is None else detail, result)
    if result < 0:
        raise error(name, -result)
    return result


def ioctl_result(fd: int, request: int, name: str, argument: Cdata, detail: Detail = "") -> int:
    """Like ioctl(), but return -errno instead of raising: for callers that branch on it."""
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
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as failure:
        trace(f"open({path}) = {errno.errorcode.get(failure.errno or 0, failure.errno)}")
        raise
    trace(f"open({path}) = fd {fd}")
    return fd
