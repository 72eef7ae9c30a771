"""The rig's initramfs: busybox, our init script and the modules to load.

Written in Python (a newc cpio archive) so that building it needs neither
cpio nor root: the /dev/console node is just an archive entry.
"""

from __future__ import annotations

import lzma
import re
import stat
from pathlib import Path

from . import RigError

#: Stock Debian modules the init loads (their dependencies come along).
STOCK_MODULES = ("9p", "9pnet_virtio", "kvm_amd", "mdev")
#: Modules the rig builds; a stock module of the same name is replaced.
OUR_MODULES = (
    "vfio",
    "vfio_iommu_type1",
    "iommufd",
    "vfio_pci_core",
    "vfio_pci",
    "mtty",
    "mtty_kvm",
)


def modname(path: str | Path) -> str:
    """Module name of a .ko[.xz] path, with '-' folded to '_' as the kernel does."""
    name = Path(path).name.split(".ko")[0]
    return name.replace("-", "_")


def ko_depends(data: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo section (raw ELF bytes)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",")]


def resolve_modules(kmod_dir: Path, built: Path) -> list[tuple[str, bytes]]:
    """Every module to load, dependencies first, as (name, uncompressed .ko bytes).

    kmod_dir is the stock /lib/modules/RELEASE (for modules.dep); built holds
    the rig's own .ko files, which win over stock modules of the same name.
    """
    step = "collect modules"
    # The .deb ships no modules.dep (depmod makes it at install time); find
    # stock modules by name through the tree and read their .modinfo instead.
    stock = {modname(p): p for p in kmod_dir.joinpath("kernel").rglob("*.ko*")}
    ours = {modname(p): p for p in built.glob("*.ko")}
    missing = [m for m in OUR_MODULES if m not in ours]
    if missing:
        raise RigError(step, f"the module build produced no {', '.join(missing)}")

    blobs: dict[str, bytes] = {}
    order: list[str] = []

    def load(name: str) -> bytes:
        if name in ours:
            return ours[name].read_bytes()
        if name not in stock:
            raise RigError(step, f"module {name} is neither stock nor built")
        p = stock[name]
        return lzma.decompress(p.read_bytes()) if p.suffix == ".xz" else p.read_bytes()

    def visit(name: str, trail: tuple[str, ...] = ()) -> None:
        if name in blobs:
            return
        if name in trail:
            raise RigError(step, f"module dependency cycle: {' -> '.join((*trail, name))}")
        data = load(name)
        for dep in ko_depends(data):
            visit(dep, (*trail, name))
        blobs[name] = data
        order.append(name)

    for name in (*STOCK_MODULES, *OUR_MODULES):
        visit(name)
    return [(n, blobs[n]) for n in order]


class Cpio:
    """A minimal writer of 'newc' cpio archives, as the kernel unpacks them."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nm = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nm), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        blob = hdr + nm
        blob += b"\0" * (-len(blob) % 4) + data
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob)

    def dir(self, name: str) -> None:
        """Add a directory."""
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        """The archive, with its trailer."""
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def write_initramfs(
    out: Path, init: bytes, busybox: Path, modules: list[tuple[str, bytes]]
) -> None:
    """Write the initramfs to ``out`` (atomically)."""
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "host", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", init, 0o755)
    for name, data in modules:
        c.file(f"lib/modules/{name}.ko", data)
    c.file("lib/modules/order", "".join(f"{n}\n" for n, _ in modules).encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.bytes())
    tmp.rename(out)
