"""Preparing the rig: download, build and cache the inner kernel's pieces.

Way A of shared/rig/README.md: Debian's stock 6.12 kernel from
bookworm-backports, plus the modules it lacks (iommufd, VFIO rebuilt with the
device cdev, mtty and the kvm-requiring mtty_kvm) built out of tree from
linux-source-6.12 against the Debian headers. About a minute on 2 cores,
against ~12 for a whole kernel.

Cache layout (under cache_root()):
  debs/               downloaded .deb files (names carry their versions)
  apt/                private apt state for bookworm-backports
  logs/               logs of every step
  kernel-KEY/         vmlinuz + modules/ (KEY: versions, Kbuild, patch, this code)
  initrd-KEY.cpio     the initramfs (KEY: kernel key, init.sh, busybox)
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import (
    HERE,
    HOST_PACKAGES,
    KERNEL_ABI,
    KERNEL_DEB_VERSION,
    KERNEL_PACKAGES,
    KERNEL_RELEASE,
    MTTY_KVM_UUID,
    MTTY_UUID,
    RigError,
    cache_root,
    digest,
)
from .initramfs import resolve_modules, write_initramfs
from .steps import download_backports, ensure_host_debs, run_step, say

#: Source paths taken from linux-source-6.12's tarball.
SOURCE_PATHS = (
    "drivers/vfio",
    "drivers/iommu/iommu-priv.h",
    "drivers/iommu/iommufd",
    "lib/interval_tree.c",
    "samples/vfio-mdev/mtty.c",
)


@dataclass
class Rig:
    """What a boot needs: the kernel image and the initramfs."""

    vmlinuz: Path
    initrd: Path


def kernel_key() -> str:
    """Cache key of the kernel build: every input that changes its output."""
    return digest(
        KERNEL_DEB_VERSION,
        KERNEL_ABI,
        *KERNEL_PACKAGES,
        (HERE / "Kbuild").read_bytes(),
        (HERE / "mtty-kvm.patch").read_bytes(),
        Path(__file__).read_bytes(),
        (HERE / "initramfs.py").read_bytes(),
    )


def busybox_path() -> Path:
    """The static busybox from Debian's busybox-static package."""
    return Path("/bin/busybox")


def deb_file(debs: Path, pkg: str) -> Path:
    """The downloaded .deb of ``pkg`` at the pinned version."""
    ver = KERNEL_DEB_VERSION.replace(":", "%3a")
    hits = sorted(debs.glob(f"{pkg}_{ver}_*.deb"))
    if not hits:
        raise RigError("extract kernel packages", f"{pkg} {KERNEL_DEB_VERSION} was not downloaded")
    return hits[0]


def fetch(debs: Path, logs: Path) -> None:
    """Download the kernel packages that are not in the cache yet."""
    ver = KERNEL_DEB_VERSION.replace(":", "%3a")
    need = [
        f"{p}={KERNEL_DEB_VERSION}"
        for p in KERNEL_PACKAGES
        if not list(debs.glob(f"{p}_{ver}_*.deb"))
    ]
    if need:
        download_backports(need, debs, cache_root() / "apt", logs / "download.log")


def extract(debs: Path, work: Path, log: Path) -> tuple[Path, Path]:
    """Unpack image, headers and the needed sources; returns (root, source dir)."""
    step = "extract kernel packages"
    root, src = work / "root", work / "src"
    root.mkdir(parents=True)
    for pkg in KERNEL_PACKAGES[:4]:
        run_step(step, ["dpkg-deb", "-x", str(deb_file(debs, pkg)), str(root)], log)
    # The headers' Makefile includes the -common tree by absolute /usr/src path.
    hdr = root / f"usr/src/linux-headers-{KERNEL_RELEASE}"
    common = root / f"usr/src/linux-headers-{KERNEL_ABI}-common"
    (hdr / "Makefile").write_text(f"include {common}/Makefile\n")
    # Stream the source tarball out of the .deb and keep only what we build.
    src.mkdir(parents=True)
    tarball = "./usr/src/linux-source-6.12.tar.xz"
    members = [f"linux-source-6.12/{p}" for p in SOURCE_PATHS]
    script = (
        f'dpkg-deb --fsys-tarfile "$1" | tar -xO {tarball} | '
        f'tar -xJ -C "$2" --strip-components=1 {" ".join(members)}'
    )
    run_step(
        step, ["sh", "-c", script, "sh", str(deb_file(debs, "linux-source-6.12")), str(src)], log
    )
    return root, src


def make_tree(src: Path, tree: Path, log: Path) -> None:
    """Lay out the out-of-tree build: sources, Kbuild, mtty_kvm, span iterator."""
    shutil.copytree(src, tree)
    shutil.copy(HERE / "Kbuild", tree / "Kbuild")
    # The stock kernel exports interval_tree_insert & co. but lacks the span
    # iterator (CONFIG_INTERVAL_TREE_SPAN_ITER): keep only that part, unexported.
    text = (tree / "lib/interval_tree.c").read_text()
    end = "EXPORT_SYMBOL_GPL(interval_tree_iter_next);\n"
    text = text[: text.index("INTERVAL_TREE_DEFINE")] + text[text.index(end) + len(end) :]
    text = re.sub(r"^EXPORT_SYMBOL_GPL\(.*\);\n", "", text, flags=re.M)
    (tree / "lib/interval_tree_span.c").write_text(text)
    mdev = tree / "samples/vfio-mdev"
    shutil.copy(mdev / "mtty.c", mdev / "mtty_kvm.c")
    run_step(
        "patch mtty_kvm",
        ["patch", "-p1", "--no-backup-if-mismatch", "-i", str(HERE / "mtty-kvm.patch")],
        log,
        cwd=mdev,
    )


def build_kernel(out: Path, logs: Path) -> None:
    """Download, unpack and build into ``out`` (vmlinuz and modules/)."""
    debs = cache_root() / "debs"
    fetch(debs, logs)
    work = out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    log = logs / "kernel.log"
    say("unpacking the kernel image, headers and sources")
    root, src = extract(debs, work, log)
    tree = work / "build"
    make_tree(src, tree, log)
    hdr = root / f"usr/src/linux-headers-{KERNEL_RELEASE}"
    say(f"building modules (vfio+cdev, iommufd, mtty, mtty_kvm) on {os.cpu_count()} cores")
    # No BTF for our modules: it would need pahole, and nothing here uses it.
    run_step(
        "build modules",
        [
            "make",
            "-C",
            str(hdr),
            f"M={tree}",
            f"-j{os.cpu_count() or 1}",
            "CONFIG_DEBUG_INFO_BTF_MODULES=",
            "modules",
        ],
        log,
        show=r"^\s*(CC|LD) \[M\]|MODPOST",
    )
    mods = work / "out/modules"
    mods.mkdir(parents=True)
    order = resolve_modules(root / f"lib/modules/{KERNEL_RELEASE}", tree)
    for name, data in order:
        (mods / f"{name}.ko").write_bytes(data)
    (mods / "order").write_text("".join(f"{n}\n" for n, _ in order))
    shutil.copy(root / f"boot/vmlinuz-{KERNEL_RELEASE}", work / "out/vmlinuz")
    (work / "out").rename(out)
    shutil.rmtree(work)


def prepare(rebuild: bool = False) -> Rig:
    """Make sure the rig is built and cached; return its boot artefacts.

    With ``rebuild`` the cached kernel build and initramfs are thrown away
    first (downloads are kept). A lock file serialises concurrent prepares.
    """
    cache = cache_root()
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare(cache, logs, rebuild)


def _prepare(cache: Path, logs: Path, rebuild: bool) -> Rig:
    t0 = time.monotonic()
    ensure_host_debs(HOST_PACKAGES, logs / "host-packages.log")
    kdir = cache / f"kernel-{kernel_key()}"
    init = (HERE / "init.sh").read_text()
    init = init.replace("@MTTY_UUID@", MTTY_UUID).replace("@MTTY_KVM_UUID@", MTTY_KVM_UUID)
    bb = busybox_path()
    bbv = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "busybox-static"], capture_output=True, text=True
    ).stdout
    initrd = cache / f"initrd-{digest(kdir.name, init, bbv)}.cpio"
    if rebuild:
        shutil.rmtree(kdir, ignore_errors=True)
        initrd.unlink(missing_ok=True)
    if not (kdir / "vmlinuz").exists():
        say(f"building the inner kernel's modules into {kdir} (cold cache: about a minute)")
        build_kernel(kdir, logs)
    if not initrd.exists():
        if not bb.exists():
            raise RigError("initramfs", f"{bb} missing (package busybox-static)")
        md = kdir / "modules"
        mods = [(n, (md / f"{n}.ko").read_bytes()) for n in (md / "order").read_text().split()]
        write_initramfs(initrd, init.encode(), bb, mods)
    # Drop builds for other inputs, so the cache holds one rig (plus downloads).
    for old in [*cache.glob("kernel-*"), *cache.glob("initrd-*")]:
        if old not in (kdir, initrd):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    if time.monotonic() - t0 > 5:
        say(f"rig ready in {time.monotonic() - t0:.0f}s")
    return Rig(kdir / "vmlinuz", initrd)
