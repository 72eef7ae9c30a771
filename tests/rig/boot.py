"""Booting the rig: QEMU/TCG runs the inner Linux, which runs one command.

The command, its working directory and environment travel in a job script in
a per-run directory that the inner system mounts (9p, writable) at the same
path; the inner init writes the command's exit status there.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import (
    BRIDGE_BDF,
    EDU_BDF,
    NONVIABLE_BDF,
    NVME_BDF,
    REPO,
    UNBOUND_BDF,
    RigError,
    cache_root,
)
from .build import Rig
from .steps import say

#: Variables not carried into the rig: they describe the host session only.
DROP_ENV = {
    "_",
    "OLDPWD",
    "PWD",
    "SHLVL",
    "TMPDIR",
    "HOSTNAME",
    "TERM_PROGRAM",
    "DISPLAY",
    "SSH_AUTH_SOCK",
    "SSH_CONNECTION",
    "SSH_CLIENT",
    "SSH_TTY",
    "LD_PRELOAD",
}

#: Where the job records the process group of CMD (inside the rig).
PGID = "/run/pyvmm-rig.pgid"

#: Console lines that are not the command's: firmware banner, power-off.
NOISE = re.compile(rb"^(\x1b|Booting from ROM|\[ *[0-9.]+\] reboot: Power down)")
#: Line starts that may be the harness's, not CMD's (held until the line ends).
PREFIXES = (b"rig-init: ", b"\x1b", b"Booting from ROM", b"[")

MEMORY = os.environ.get("PYVMM_RIG_MEMORY", "2G")
CPUS = os.environ.get("PYVMM_RIG_CPUS", "2")


def job_script(cmd: list[str], cwd: Path, env: dict[str, str], run: Path) -> str:
    """The shell script the inner system runs in the chroot of the host root.

    It leaves CMD's exit status in RUN/status.
    """
    lines = ["# written by tests.rig: runs inside the rig", ". /run/pyvmm-rig.env"]
    for k, v in sorted(env.items()):
        if k in DROP_ENV or not k.isidentifier():
            continue
        lines.append(f"export {k}={shlex.quote(v)}")
    # The host's Python comes first, so `python` inside is the interpreter
    # that runs this harness (with its site-packages and editable installs).
    lines.append(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"')
    q = shlex.quote
    status = q(str(run / "status"))
    # CMD runs in a session of its own (util-linux setsid -w waits for it),
    # whose id it records, so that whatever it leaves running in the
    # background is killed when it exits and cannot hold its output open.
    inner = f"echo $$ >{PGID}; cd {q(str(cwd))} || exit 126; exec {' '.join(map(q, cmd))}"
    run_cmd = f"setsid -w sh -c {q(inner)} </dev/null"
    reap = f'kill -KILL -"$(cat {PGID})" 2>/dev/null'
    if sys.stdout.isatty():
        lines.append(f"{run_cmd}; echo $? >{status}; {reap}")
    else:
        # Inside, stdout would be the serial console, a tty: when the
        # harness's own output is not a terminal, give CMD a pipe too, so it
        # behaves as it would on the host (no colours, no \r progress).
        lines.append("export PYTHONUNBUFFERED=1")
        lines.append(f"{{ {run_cmd} 2>&1; echo $? >{status}; {reap}; }} | cat")
    return "\n".join(lines) + "\n"


#: Size of the NVMe controller's backing file (sparse, in the run directory).
NVME_IMAGE_SIZE = 1 << 20


def slot(bdf: str) -> str:
    """QEMU's addr= (slot.function, hex) of a BDF such as 0000:01:02.0."""
    dev, fn = bdf.rsplit(":", 1)[1].split(".")
    return f"{int(dev, 16):x}.{fn}"


def pci_argv(run: Path) -> list[str]:
    """The PCI devices tests use, at the fixed addresses of tests/rig/__init__.py.

    Behind the conventional PCI bridge (no PCIe: its devices' DMA carries the
    bridge's requester ID, so the bridge and both share one IOMMU group) an
    edu for vfio-pci and a pci-serial that the built-in 8250 driver claims,
    which makes that group not viable. shpc=off: no hotplug controller that a
    driver could claim on the bridge itself.
    """
    # fmt: off
    return [
        "-device", f"edu,addr={slot(EDU_BDF)}",
        "-drive", f"file={run / 'nvme.img'},if=none,id=nvm,format=raw",
        "-device", f"nvme,serial=pyvmm0,drive=nvm,addr={slot(NVME_BDF)}",
        "-device", f"pci-bridge,id=br0,chassis_nr=1,shpc=off,bus=pcie.0,addr={slot(BRIDGE_BDF)}",
        "-device", f"edu,bus=br0,addr={slot(NONVIABLE_BDF)}",
        "-device", f"pci-serial,bus=br0,addr={slot(UNBOUND_BDF)}",
    ]
    # fmt: on


def qemu_argv(rig: Rig, run: Path, repo: Path) -> list[str]:
    """The QEMU command line (see shared/rig/README.md for why each option)."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise RigError("boot", "qemu-system-x86_64 not found (package qemu-system-x86)")
    append = (
        f"console=ttyS0 quiet loglevel=3 panic=-1 intel_iommu=on iommu=pt "
        f"pyvmm_rig.run={run} pyvmm_rig.repo={repo} pyvmm_rig.edu={EDU_BDF} "
        f"pyvmm_rig.nvme={NVME_BDF} pyvmm_rig.nonviable={NONVIABLE_BDF} "
        f"pyvmm_rig.unbound={UNBOUND_BDF}"
    )
    # thread=single: multi-threaded TCG races with the kernel's cross-CPU
    # code patching (text_poke_bp: kprobes, static keys); with -smp 2 a stale
    # int3 then oopses the inner kernel ("Oops: int3" in a few seconds of
    # kprobe add/remove). One TCG thread round-robins the vCPUs, coherently.
    # fmt: off
    return [
        qemu, "-machine", "q35,kernel-irqchip=split", "-accel", "tcg,thread=single",
        "-cpu", "max", "-smp", CPUS, "-m", MEMORY,
        "-nographic", "-no-reboot", "-nic", "none",
        "-device", "intel-iommu,caching-mode=on,intremap=on", *pci_argv(run),
        "-kernel", str(rig.vmlinuz), "-initrd", str(rig.initrd), "-append", append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={repo},mount_tag=rigrepo,security_model=none",
        "-virtfs", f"local,path={run},mount_tag=rigrun,security_model=none",
    ]
    # fmt: on


class Console:
    """Splits the inner serial console: CMD's output to stdout as it comes,
    the init's "rig-init: " lines to stderr, firmware and power-off noise away.
    """

    def __init__(self) -> None:
        self.pending = b""  # start of a line not yet known to be CMD's
        self.passing = False  # inside a line already known to be CMD's
        self.failed: str | None = None

    def feed(self, data: bytes) -> None:
        """Handle the next chunk of console output."""
        out = sys.stdout.buffer
        if self.passing:  # finish the line already passed on, then go line by line
            head, nl, data = data.partition(b"\n")
            out.write(head + nl)
            if not nl:
                out.flush()
                return
            self.passing = False
        *lines, rest = (self.pending + data).split(b"\n")
        for line in lines:
            self.line(line + b"\n")
        self.pending = rest
        # Pass on a partial line (pytest's progress dots) once it cannot be ours.
        if rest and not any(p.startswith(rest[: len(p)]) for p in PREFIXES):
            out.write(rest)
            self.pending, self.passing = b"", True
        out.flush()

    def line(self, line: bytes) -> None:
        """Handle one whole line."""
        # The init's first line follows the firmware's output and the terminal
        # resets ("\x1bc\x1b[?7l\x1b[2J", interleaved with "Booting from ROM...")
        # with no newline between: look for it inside such noise too.
        at = line.find(b"rig-init: ")
        if at == 0 or (at > 0 and NOISE.match(line)):
            text = line[at:].decode(errors="replace").strip()[len("rig-init: ") :]
            if text.startswith("FAILED: "):
                self.failed = text[len("FAILED: ") :]
            say(text)
        elif not NOISE.match(line):
            sys.stdout.buffer.write(line)


def run_in_rig(
    rig: Rig,
    cmd: list[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> int:
    """Boot the rig, run ``cmd`` in it and return its exit status.

    The command's output (the inner serial console) is copied to stdout as it
    comes, and kept with the kernel's messages in the run's console log;
    lines of the inner init ("rig-init: ...") go to stderr as progress.
    """
    cwd = (cwd or Path.cwd()).resolve()
    repo = REPO.resolve()
    for p in (cwd, repo):
        if any(c.isspace() for c in str(p)):
            raise RigError("boot", f"paths with blanks are not supported: {p}")
    if cache_root().is_relative_to("/tmp"):
        # The inner /tmp is a tmpfs of its own: the job script would not be seen.
        raise RigError(
            "boot",
            f"the cache {cache_root()} is under /tmp, which the rig does not "
            "share: set PYVMM_RIG_CACHE elsewhere (e.g. /var/tmp)",
        )
    runs = cache_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    environ = dict(os.environ if env is None else env)
    with open(run / "nvme.img", "wb") as img:  # the NVMe controller's disk, sparse
        img.truncate(NVME_IMAGE_SIZE)
    (run / "job.sh").write_text(job_script(cmd, cwd, environ, run))
    console = run / "console.log"
    t0 = time.monotonic()
    con = Console()
    with open(console, "wb") as log:
        proc = subprocess.Popen(
            qemu_argv(rig, run, repo),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        try:
            while data := os.read(proc.stdout.fileno(), 65536):
                log.write(data)
                log.flush()
                con.feed(data)
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    status = run / "status"
    if timeout and time.monotonic() - t0 >= timeout and not status.exists():
        raise RigError("run", f"timed out after {timeout:.0f}s", console)
    if con.failed:
        raise RigError(f"inner set-up: {con.failed}", "the inner init stopped", console)
    status = run / "status"
    if not status.exists():
        raise RigError(
            "run",
            f"the inner system stopped (QEMU exit {proc.returncode}) before the command finished",
            console,
        )
    rc = int(status.read_text().strip() or "1")
    say(f"command exited {rc} after {time.monotonic() - t0:.1f}s in the rig")
    shutil.rmtree(run, ignore_errors=True)
    return rc
