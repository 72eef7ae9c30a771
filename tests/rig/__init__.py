"""The nested test rig: a real KVM + VFIO + iommufd + mdev stack for tests.

``python -m tests.rig [--rebuild] -- CMD...`` prepares the rig (downloads,
builds and caches what it needs) and runs CMD inside an inner Linux booted
under QEMU/TCG, with the host's root file system, the project tree (at the
same path, writable) and the host's Python visible. See docs/rig.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Debian bookworm-backports kernel, pinned. The rig's cache key includes it.
KERNEL_DEB_VERSION = os.environ.get("PYVMM_RIG_KERNEL_DEB_VERSION", "6.12.95-1~bpo12+1")
#: The kernel ABI name that goes with KERNEL_DEB_VERSION.
KERNEL_ABI = os.environ.get("PYVMM_RIG_KERNEL_ABI", "6.12.95+deb12")
KERNEL_FLAVOUR = "amd64"
KERNEL_RELEASE = f"{KERNEL_ABI}-{KERNEL_FLAVOUR}"

#: Packages downloaded (not installed) from bookworm-backports.
KERNEL_PACKAGES = (
    f"linux-image-{KERNEL_RELEASE}-unsigned",
    f"linux-headers-{KERNEL_RELEASE}",
    f"linux-headers-{KERNEL_ABI}-common",
    f"linux-kbuild-{KERNEL_ABI}",
    "linux-source-6.12",
)

#: Host packages (bookworm) the rig installs with apt-get when missing.
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "gcc-12", "make", "patch", "xz-utils")

#: Fixed mdev UUIDs, so tests and logs are stable.
MTTY_UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
MTTY_KVM_UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002"

#: PCI addresses of the rig's devices, fixed by addr= on QEMU's command line
#: (boot.py), checked and bound by the inner init, exported to tests as
#: PYVMM_RIG_EDU, _NVME, _NONVIABLE and _UNBOUND. Bus 01 is behind the one
#: conventional PCI bridge at 00:04.0: the bridge and both devices behind it
#: share one IOMMU group.
EDU_BDF = "0000:00:02.0"  # edu 1234:11e8 on vfio-pci (MSI, INTx)
NVME_BDF = "0000:00:03.0"  # QEMU NVMe 1b36:0010 on vfio-pci (MSI-X)
BRIDGE_BDF = "0000:00:04.0"  # pci-bridge 1b36:0001, no driver
NONVIABLE_BDF = "0000:01:01.0"  # edu on vfio-pci, its group not viable
UNBOUND_BDF = "0000:01:02.0"  # pci-serial 1b36:0002 on the 8250 driver "serial"

#: Exit status of ``python -m tests.rig`` when the rig itself failed.
RIG_FAILED = 125

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class RigError(Exception):
    """A step of preparing or running the rig failed.

    str() is the one-line message shown to the user; it names the step and,
    where there is one, the log kept on disk.
    """

    def __init__(self, step: str, why: str, log: Path | None = None) -> None:
        self.step, self.why, self.log = step, why, log
        where = f" (log: {log})" if log else ""
        super().__init__(f"rig: step '{step}' failed: {why}{where}")


def cache_root() -> Path:
    """The cache directory: $PYVMM_RIG_CACHE or ~/.cache/pyvmm-rig."""
    env = os.environ.get("PYVMM_RIG_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "pyvmm-rig"


def digest(*parts: str | bytes) -> str:
    """A short stable hash of the given inputs (used as cache keys)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]
