"""The benchmark's surroundings: the machine it runs on, KVM, the guest images, the C VMM.

Kept apart from bench/exits.py, which is about running and timing.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE_SOURCE = HERE / "reference_vmm.c"


def describe_machine() -> str:
    """CPU model, core count, and whether KVM looks hardware-assisted or software-emulated."""
    model, flags, hypervisor = "unknown CPU", set(), False
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    hypervisor = "hypervisor" in flags
    modules = {m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path("/sys/module", m).exists()}
    if "kvm_pvm" in modules and not flags & {"vmx", "svm"}:
        kvm = "KVM via kvm_pvm, no vmx/svm in CPU flags: software (PVM), not hardware-assisted"
    elif flags & {"vmx", "svm"} and modules & {"kvm_intel", "kvm_amd"}:
        which = "vmx" if "vmx" in flags else "svm"
        kvm = f"KVM hardware-assisted ({which}, {'/'.join(sorted(modules))})"
    elif not flags & {"vmx", "svm"}:
        kvm = "KVM without vmx/svm in CPU flags: looks software-emulated"
    else:
        kvm = f"KVM ({', '.join(sorted(modules)) or 'module unknown'})"
    guest = ", itself a VM guest" if hypervisor else ""
    return f"{model}, {os.cpu_count()} CPUs{guest}; {kvm}; Linux {platform.release()}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, to tell a busy machine from a quiet one."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def kvm_unusable_reason() -> str | None:
    """Why /dev/kvm cannot be used here, or None if it can."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        return f"/dev/kvm is unusable: {error.strerror}"
    os.close(fd)
    try:
        import pyvmm  # noqa: F401  (the benchmark needs it installed: pip install -e .)
        from pyvmm.machine import Machine

        with Machine(memory="4M", serial="capture"):
            pass
    except Exception as error:
        return f"cannot create a KVM VM: {type(error).__name__}: {error}"
    return None


def guest_images() -> tuple[Path, Path]:
    """The benchmark guest as ELF32 (for pyvmm) and as a flat binary (for the C VMM)."""
    import pyvmm

    elf = Path(pyvmm.guest_path("exits"))
    binary = elf.with_suffix(".bin")
    for path in (elf, binary):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: rebuild pyvmm (pip install -e .)")
    return elf, binary


def build_reference(directory: Path) -> Path:
    """Compile bench/reference_vmm.c with gcc into directory; returns the executable."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (gcc) on PATH")
    executable = directory / "reference_vmm"
    command = [compiler, "-O2", "-Wall", "-o", str(executable), str(REFERENCE_SOURCE)]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    if built.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{built.stderr.strip()}")
    return executable
