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
import time
from pathlib import Path

from . import REPO, RigError, cache_root
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

#: Inner machine: AMD model with SVM (TCG has no VMX), emulated VT-d, edu.
#: Console lines that are not the command's: firmware banner, power-off.
NOISE = re.compile(rb"^(\x1b|Booting from ROM|\[ *[0-9.]+\] reboot: Power down)")

MEMORY = os.environ.get("PYVMM_RIG_MEMORY", "2G")
CPUS = os.environ.get("PYVMM_RIG_CPUS", "2")


def job_script(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """The shell script the inner system runs in the chroot of the host root."""
    lines = ["# written by tests.rig: runs inside the rig", ". /run/pyvmm-rig.env"]
    for k, v in sorted(env.items()):
        if k in DROP_ENV or not k.isidentifier():
            continue
        lines.append(f"export {k}={shlex.quote(v)}")
    # The host's Python comes first, so `python` inside is the interpreter
    # that runs this harness (with its site-packages and editable installs).
    lines.append(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"')
    if not sys.stdout.isatty():
        # Inside, stdout is the serial console, a tty: keep colour codes out
        # of logs when the harness's own output is not a terminal.
        lines.append("export PY_COLORS=0 NO_COLOR=1 TERM=dumb")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 126")
    lines.append("exec " + " ".join(shlex.quote(a) for a in cmd))
    return "\n".join(lines) + "\n"


def qemu_argv(rig: Rig, run: Path, repo: Path) -> list[str]:
    """The QEMU command line (see shared/rig/README.md for why each option)."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise RigError("boot", "qemu-system-x86_64 not found (package qemu-system-x86)")
    append = (
        f"console=ttyS0 quiet loglevel=3 panic=-1 intel_iommu=on iommu=pt "
        f"pyvmm_rig.run={run} pyvmm_rig.repo={repo}"
    )
    return [
        qemu,
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        CPUS,
        "-m",
        MEMORY,
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-device",
        "intel-iommu,caching-mode=on,intremap=on",
        "-device",
        "edu",
        "-kernel",
        str(rig.vmlinuz),
        "-initrd",
        str(rig.initrd),
        "-append",
        append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={repo},mount_tag=rigrepo,security_model=none",
        "-virtfs",
        f"local,path={run},mount_tag=rigrun,security_model=none",
    ]


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
    runs = cache_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    (run / "job.sh").write_text(job_script(cmd, cwd, dict(os.environ if env is None else env)))
    console = run / "console.log"
    t0 = time.monotonic()
    failed = None
    with open(console, "wb") as log:
        proc = subprocess.Popen(
            qemu_argv(rig, run, repo),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        try:
            deadline = None if timeout is None else t0 + timeout
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                if line.startswith(b"rig-init: "):
                    text = line.decode(errors="replace").strip()
                    if text.startswith("rig-init: FAILED: "):
                        failed = text[len("rig-init: FAILED: ") :]
                    say(text[len("rig-init: ") :])
                elif not NOISE.match(line):
                    sys.stdout.buffer.write(line)
                    sys.stdout.buffer.flush()
                if deadline and time.monotonic() > deadline:
                    proc.kill()
                    raise RigError("run", f"timed out after {timeout:.0f}s", console)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    status = run / "status"
    if failed:
        raise RigError(f"inner set-up: {failed}", "the inner init stopped", console)
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
