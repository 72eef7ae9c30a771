"""Boot protocols: which one an image speaks, loading it, and how its CPUs are entered.

``pyvmm run IMAGE`` picks the protocol from the image, as QEMU's -kernel does, and
``--boot`` forces one:

* "multiboot": a valid multiboot v1 header in the first 8192 bytes (multiboot.py). A PC-style
  boot: only the boot CPU starts; the others wait in the in-kernel LAPIC for INIT/SIPI.
* "elf": anything else, with pyvmm's own entry ABI (loader.py, docs/guest-abi.md): every
  vCPU at the entry at once, its index and the count in RDI/RSI.
* "linux": the Linux x86 boot protocol (linux.py), recognised first, by its "HdrS" setup
  header at 0x202, as QEMU tests for it before it looks for a multiboot header. A PC-style
  boot too, entered at the bzImage's 64-bit entry point.

Each protocol module loads the image into guest RAM; this one returns a BootPlan that tells
the Machine how to create and enter the vCPUs.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.errors import ConfigurationError, GuestImageError
from pyvmm.imagefile import open_regular
from pyvmm.kvm import Vcpu
from pyvmm.layout import BOOT_GDT, Region
from pyvmm.linux import LinuxImage, enter_linux, is_bzimage, load_linux
from pyvmm.loader import LoadedImage, load_elf
from pyvmm.memory import GuestMemory
from pyvmm.multiboot import BOOTLOADER_MAGIC, MultibootInfo, load_multiboot
from pyvmm.multiboot_header import HEADER_SEARCH, find_header
from pyvmm.x86 import CpuMode


class BootProtocol(enum.Enum):
    """How a guest image is loaded and entered."""

    ELF = "elf"
    MULTIBOOT = "multiboot"
    LINUX = "linux"


@dataclass(frozen=True)
class BootPlan:
    """A loaded guest and what its vCPUs need at entry."""

    protocol: BootProtocol
    image: LoadedImage
    mode: CpuMode
    #: General-purpose registers the boot CPU gets on top of the mode's defaults.
    registers: Mapping[str, int] = field(default_factory=dict)
    #: A PC-style start: vCPU 0 only, the others left to INIT/SIPI through the in-kernel
    #: LAPIC (which this needs). False: every vCPU at the entry at once.
    boot_cpu_only: bool = False
    multiboot: MultibootInfo | None = None
    #: Where the boot GDT goes; the GDT and the protocol's own low regions as this boot placed
    #: them (None: their usual places, layout.py).
    gdt: Region = BOOT_GDT
    regions: tuple[Region, ...] | None = None
    linux: LinuxImage | None = None
    #: Adjusts the boot CPU after the mode's set-up (Linux's selectors), if the protocol needs.
    enter: Callable[[Vcpu], None] | None = None
    #: Things worth telling the user that do not stop the boot (one line each).
    warnings: tuple[str, ...] = ()


def _read_head(path: Path) -> tuple[bytes, int]:
    with open_regular(path, "guest image") as file:
        try:
            return file.read(HEADER_SEARCH), os.fstat(file.fileno()).st_size
        except OSError as error:
            raise GuestImageError(f"cannot read guest image {path}: {error.strerror}") from None


def load_guest(
    memory: GuestMemory,
    path: str | Path,
    *,
    mode: CpuMode | str | None = None,
    boot: BootProtocol | str | None = None,
    append: str | bytes = "",
    initrd: Sequence[str | Path] = (),
) -> BootPlan:
    """Recognise the image's boot protocol (or use boot), load it and say how to enter it.

    mode is the CPU mode of an ELF guest (default: long for ELF64, protected for ELF32).
    append and initrd are a multiboot kernel's command line (after its path, as QEMU writes
    it) and modules ("FILE" or "FILE ARGS" each, loaded in order; a lone string is one).
    """
    mode = CpuMode(mode) if mode is not None else None
    if isinstance(initrd, str | os.PathLike):
        initrd = [initrd]  # one module, not a string's characters
    try:
        protocol = BootProtocol(boot) if boot is not None else None
    except ValueError:
        choices = ", ".join(p.value for p in BootProtocol)
        raise ConfigurationError(f"unknown boot protocol {boot!r}: use {choices}") from None
    path_text = os.fspath(path)
    head, size = _read_head(Path(path))
    if protocol is None and is_bzimage(head):
        protocol = BootProtocol.LINUX
    if protocol is BootProtocol.LINUX:
        return _load_linux(memory, path_text, mode, append, initrd)
    header = None
    if protocol in (None, BootProtocol.MULTIBOOT):
        header = find_header(Path(path), head, size)
        if header is None and protocol is BootProtocol.MULTIBOOT:
            raise GuestImageError(
                f"{path}: no multiboot header (magic 0x1badb002, 4-byte aligned) in its first "
                f"{HEADER_SEARCH} bytes: it is not a multiboot kernel"
            )
        protocol = BootProtocol.MULTIBOOT if header is not None else BootProtocol.ELF

    if protocol is BootProtocol.MULTIBOOT:
        if mode not in (None, CpuMode.PROTECTED):
            raise ConfigurationError(
                f"a multiboot kernel is entered in 32-bit protected mode, not {mode.value}: "
                "drop --mode"
            )
        info = load_multiboot(memory, path_text, header, append=append, modules=initrd)
        return BootPlan(
            protocol,
            info.image,
            CpuMode.PROTECTED,
            registers={"rax": BOOTLOADER_MAGIC, "rbx": info.address},
            boot_cpu_only=True,
            multiboot=info,
            gdt=info.gdt,
            regions=info.regions,
            warnings=info.warnings,
        )

    if append or initrd:
        raise ConfigurationError(
            f"--append and --initrd are for multiboot kernels and Linux bzImages: {path} boots "
            "with pyvmm's ELF entry ABI, which has no command line or modules"
        )
    image = load_elf(memory, path, real_mode=mode is CpuMode.REAL)
    chosen = mode or (CpuMode.LONG if image.elf_class == 64 else CpuMode.PROTECTED)
    if chosen is CpuMode.LONG and image.elf_class != 64:
        raise ConfigurationError(f"{path} is ELF32: it cannot be entered in long mode")
    return BootPlan(protocol, image, chosen)


def _load_linux(
    memory: GuestMemory,
    path: str,
    mode: CpuMode | None,
    append: str | bytes,
    initrd: Sequence[str | Path],
) -> BootPlan:
    if mode not in (None, CpuMode.LONG):
        raise ConfigurationError(
            f"a bzImage is entered at its 64-bit entry point, in long mode, not {mode.value}: "
            "drop --mode"
        )
    if len(initrd) > 1:
        raise ConfigurationError("a Linux kernel takes one --initrd file (a cpio archive)")
    image = load_linux(memory, path, append, initrd[0] if initrd else None)
    return BootPlan(
        BootProtocol.LINUX,
        LoadedImage(Path(path), image.entry, 64, ()),
        CpuMode.LONG,
        registers={"rsi": image.zero_page},
        boot_cpu_only=True,
        linux=image,
        enter=enter_linux,
    )
