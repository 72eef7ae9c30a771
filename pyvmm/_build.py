"""The cffi build module: declares pyvmm's C interface and compiles it in API mode.

The C headers in pyvmm/csrc are the single source of truth. The part of each header between
``/* cdef-begin */`` and ``/* cdef-end */`` is handed to cffi as is, and every integer
``#define`` becomes a constant whose value the C compiler works out (``#define NAME ...``),
so ioctl numbers are computed from the struct sizes exactly as the kernel's macros do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

# setuptools wants source paths relative to the project root, where builds run.
CSRC = Path(os.path.relpath(Path(__file__).resolve().parent / "csrc"))
HEADERS = ("kvm_uapi.h", "vfio_uapi.h", "pyvmm.h")
SOURCES = ("runloop.c", "uart.c", "uart_tx.c")

_DEFINE = re.compile(r"^#define[ \t]+([A-Z][A-Za-z0-9_]*)[ \t]+\S", re.MULTILINE)
_CDEF_BLOCK = re.compile(r"/\* cdef-begin \*/(.*?)/\* cdef-end \*/", re.DOTALL)


def cdef_text(header: str) -> str:
    """Return what cffi must declare for one header: its cdef block and its constants."""
    declarations = "\n".join(_CDEF_BLOCK.findall(header))
    constants = "\n".join(f"#define {name} ..." for name in _DEFINE.findall(header))
    return declarations + "\n" + constants


def make_ffibuilder() -> FFI:
    """Build the FFI for pyvmm._native from the headers in pyvmm/csrc."""
    builder = FFI()
    for name in HEADERS:
        builder.cdef(cdef_text((CSRC / name).read_text()))
    builder.set_source(
        "pyvmm._native",
        '#include "pyvmm.h"',
        sources=[str(CSRC / name) for name in SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
