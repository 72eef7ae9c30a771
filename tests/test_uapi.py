"""Check pyvmm's own KVM uAPI declarations (pyvmm/csrc/kvm_uapi.h) against the system headers.

A C program generated from cffi's view of every struct and constant is compiled with gcc
against <linux/kvm.h>; its sizes, offsets and values are compared with ffi and lib.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import pyvmm
from pyvmm._native import ffi, lib

CSRC = Path(pyvmm.__file__).resolve().parent / "csrc"
UAPI_H = CSRC / "kvm_uapi.h"
_DEFINE = re.compile(r"^#define[ \t]+([A-Z][A-Za-z0-9_]*)[ \t]+\S", re.MULTILINE)
_STRUCT = re.compile(r"^struct[ \t]+(\w+)[ \t]*\{", re.MULTILINE)
PRELUDE = "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
#: Each of pyvmm's uAPI headers, the system header it mirrors, and the least it must compare
#: with this machine's 6.1 headers (structs, fields, constants).
HEADERS = {
    "kvm_uapi.h": ("linux/kvm.h", (20, 150, 90)),
    "vfio_uapi.h": ("linux/vfio.h", (8, 30, 40)),
}
MASK64 = (1 << 64) - 1

# Newer names pyvmm uses -> the older name an older <linux/kvm.h> gives the same value.
ALIASES = {
    "KVM_DEV_VFIO_FILE": "KVM_DEV_VFIO_GROUP",
    "KVM_DEV_VFIO_FILE_ADD": "KVM_DEV_VFIO_GROUP_ADD",
    "KVM_DEV_VFIO_FILE_DEL": "KVM_DEV_VFIO_GROUP_DEL",
}

# Values that 6.1 headers lack or that pyvmm must get right regardless of the headers, copied
# from /work/shared/notes/uapi.md (taken there from include/uapi/linux/kvm.h, x86_64).
DOCUMENTED = {
    "KVM_DEV_VFIO_FILE": 1,
    "KVM_DEV_VFIO_FILE_ADD": 1,
    "KVM_DEV_VFIO_FILE_DEL": 2,
    "KVM_CREATE_DEVICE": 0xC00CAEE0,
    "KVM_SET_DEVICE_ATTR": 0x4018AEE1,
    "KVM_HAS_DEVICE_ATTR": 0x4018AEE3,
    "KVM_DEV_TYPE_VFIO": 4,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_SET_GSI_ROUTING": 0x4008AE6A,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    # VFIO device cdev and iommufd (6.6+ and 6.2+; absent from 6.1 headers)
    "VFIO_DEVICE_BIND_IOMMUFD": 0x3B76,
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": 0x3B77,
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": 0x3B78,
    "IOMMU_DESTROY": 0x3B80,
    "IOMMU_IOAS_ALLOC": 0x3B81,
    "IOMMU_IOAS_MAP": 0x3B85,
    "IOMMU_IOAS_UNMAP": 0x3B86,
    "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_SET_IRQS": 0x3B6E,
}
#: Sizes of the structs 6.1 headers lack, as ../shared/notes/uapi.md gives them.
DOCUMENTED_SIZES = {
    "vfio_device_bind_iommufd": 16,
    "vfio_device_attach_iommufd_pt": 12,
    "vfio_device_detach_iommufd_pt": 8,
    "iommu_ioas_alloc": 12,
    "iommu_ioas_map": 40,
    "iommu_ioas_unmap": 24,
    "iommu_destroy": 8,
}


def _gcc(source: str, workdir: Path, name: str, *, link: bool) -> subprocess.CompletedProcess[str]:
    """Compile one C source (to an executable if link, else syntax only)."""
    path = workdir / f"{name}.c"
    path.write_text(source)
    args = ["-o", str(workdir / name)] if link else ["-fsyntax-only"]
    return subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", *args, str(path)], capture_output=True, text=True
    )


def _fields(ctype: Any, prefix: str = "", base: int = 0) -> list[tuple[str, int, int | None]]:
    """Every field path in a cffi struct/union (recursing into named nested aggregates).

    cffi flattens anonymous members, so their fields come out under their own names, which
    is also how C reaches them. Returns (path, offset, size); size is None for a flexible array.
    """
    out: list[tuple[str, int, int | None]] = []
    for name, field in ctype.fields:
        path, offset, ftype = prefix + name, base + field.offset, field.type
        flexible = ftype.kind == "array" and ftype.length is None
        out.append((path, offset, None if flexible else ffi.sizeof(ftype)))
        if ftype.kind in ("struct", "union"):
            out.extend(_fields(ftype, path + ".", offset))
    return out


def _probe_program(structs: list[str], constants: list[str], prelude: str) -> str:
    """The C program printing the system's sizes, offsets and constant values."""
    lines = [prelude, "int main(void)\n{"]
    for struct in structs:
        lines.append(f'\tprintf("S {struct} - %zu\\n", sizeof(struct {struct}));')
        for path, _, size in _fields(ffi.typeof(f"struct {struct}")):
            off = f"offsetof(struct {struct}, {path})"
            if size is None:
                lines.append(f'\tprintf("F {struct} {path} %zu -1\\n", {off});')
            else:
                fsize = f"sizeof(((struct {struct} *)0)->{path})"
                lines.append(f'\tprintf("F {struct} {path} %zu %zu\\n", {off}, {fsize});')
    for name in constants:
        lines.append(f"#if defined({name})")
        lines.append(f'\tprintf("C {name} - %llu\\n", (unsigned long long)({name}));')
        if name in ALIASES:
            alias = ALIASES[name]
            lines.append(f"#elif defined({alias})")
            lines.append(f'\tprintf("C {name} {alias} %llu\\n", (unsigned long long)({alias}));')
        lines.append("#endif")
    lines.append("\treturn 0;\n}\n")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    path = tmp_path_factory.mktemp("uapi")
    probe = _gcc(PRELUDE, path, "has_kvm_h", link=False)
    if probe.returncode != 0:
        pytest.skip(f"<linux/kvm.h> is not usable: {probe.stderr.strip()[:300]}")
    return path


@pytest.mark.parametrize("ours", sorted(HEADERS))
def test_uapi_matches_system_headers(ours: str, workdir: Path, record_property: Any) -> None:
    system, least = HEADERS[ours]
    prelude = f"#include <stdio.h>\n#include <stddef.h>\n#include <{system}>\n"
    header = (CSRC / ours).read_text()
    constants = _DEFINE.findall(header)
    declared = _STRUCT.findall(header)
    assert not [c for c in constants if not hasattr(lib, c)], "kvm_uapi.h define not in lib"

    def system_has(struct: str) -> bool:
        src = f"{prelude}char probe_[sizeof(struct {struct})];\n"
        return _gcc(src, workdir, f"probe_{struct}", link=False).returncode == 0

    with ThreadPoolExecutor(max_workers=8) as pool:
        present = dict(zip(declared, pool.map(system_has, declared), strict=True))
    structs = [s for s in declared if present[s]]

    build = _gcc(_probe_program(structs, constants, prelude), workdir, "uapi_probe", link=True)
    assert build.returncode == 0, f"probe program does not compile:\n{build.stderr}"
    run = subprocess.run([str(workdir / "uapi_probe")], capture_output=True, text=True, check=True)

    theirs: dict[tuple[str, str, str], tuple[int, ...]] = {}
    aliased: list[str] = []
    for line in run.stdout.splitlines():
        kind, owner, path, *values = line.split()
        if kind == "C" and path != "-":
            aliased.append(f"{owner}->{path}")
        theirs[(kind, owner, "-" if kind == "C" else path)] = tuple(int(v) for v in values)

    ours: dict[tuple[str, str, str], tuple[int, ...]] = {}
    for struct in structs:
        ours[("S", struct, "-")] = (ffi.sizeof(f"struct {struct}"),)
        for path, offset, size in _fields(ffi.typeof(f"struct {struct}")):
            ours[("F", struct, path)] = (offset, -1 if size is None else size)
    for name in constants:
        if ("C", name, "-") in theirs:
            ours[("C", name, "-")] = (getattr(lib, name) & MASK64,)

    labels = {"S": "sizeof", "F": "field (offset, size)", "C": "constant"}
    mismatches = [
        f"{labels[kind]} {owner}{'' if path == '-' else '.' + path}: "
        f"ours={ours[key]} theirs={theirs.get(key)}"
        for key in ours
        if ours[key] != theirs.get(key)
        for kind, owner, path in [key]
    ]
    counts = {k: sum(1 for key in ours if key[0] == k) for k in "SFC"}
    skipped_structs = [s for s in declared if not present[s]]
    skipped_consts = [c for c in constants if ("C", c, "-") not in theirs]
    summary = (
        f"uapi: compared {counts['S']} structs, {counts['F']} fields, {counts['C']} constants "
        f"(via alias: {aliased or 'none'}); system lacks structs {skipped_structs or 'none'}, "
        f"constants {skipped_consts or 'none'}"
    )
    print("\n" + summary)
    record_property("uapi_summary", summary)

    assert not mismatches, "pyvmm's kvm_uapi.h differs from <linux/kvm.h>:\n" + "\n".join(
        mismatches
    )
    assert counts["S"] >= least[0] and counts["F"] >= least[1] and counts["C"] >= least[2], summary


def test_documented_values_absent_from_old_headers() -> None:
    wrong = {
        name: (hex(getattr(lib, name, -1) & MASK64), hex(value))
        for name, value in DOCUMENTED.items()
        if getattr(lib, name, None) != value
    }
    assert not wrong, f"(ours, documented) differ: {wrong}"


def test_documented_sizes_of_structs_absent_from_old_headers() -> None:
    wrong = {
        name: (ffi.sizeof(f"struct {name}"), size)
        for name, size in DOCUMENTED_SIZES.items()
        if ffi.sizeof(f"struct {name}") != size
    }
    assert not wrong, f"(ours, documented) differ: {wrong}"
