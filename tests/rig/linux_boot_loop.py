"""Boot the rig's kernel N times under pyvmm and under QEMU (accel=kvm), inside the rig, and
record how far each boot got: the evidence for the early-hang question of docs/rig.md.

Run it inside the rig, one rig at a time::

    python -m tests.rig --timeout 3000 -- python -m tests.rig.linux_boot_loop \\
        --out boot-logs --boots 15 --vmm pyvmm,qemu --cpus 1,2

Boots are interleaved (pyvmm, QEMU, pyvmm, ...) so that load on the host weighs on both alike.
Every boot keeps its console log, pyvmm's stderr (its register dump on timeout) or QEMU's
``info registers`` taken from its monitor before it is killed, in OUT; OUT/boots.jsonl has one
line per boot and the summary table is printed at the end. A hang's RIP is named from the
rig's /proc/kallsyms (the same kernel), which is right only with ``nokaslr`` in the command
line, the default here.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.rig import cache_root
from tests.rig.build import kernel_key
from tests.rig.initramfs import write_initramfs

MARKER = "PYVMM-LINUX-MARKER"
QEMU = "/usr/bin/qemu-system-x86_64"
DEFAULT_APPEND = "console=ttyS0 panic=-1 nokaslr"
#: The kernel's link address of _text; the rig's KASLR slide is kallsyms' _text minus this.
LINKED_TEXT = 0xFFFF_FFFF_8100_0000
#: Where a nokaslr kernel's text lies, to pick return addresses out of a stack dump.
KERNEL_TEXT = (LINKED_TEXT, 0xFFFF_FFFF_8300_0000)


def write_boot_initramfs(path: Path) -> None:
    """An initramfs whose /init prints the marker and powers off, like test_rig_linux.py's."""
    init = f"""#!/bin/sh
b=/bin/busybox
$b mount -t proc proc /proc
echo {MARKER} uptime $($b cut -d' ' -f1 /proc/uptime) cpus $($b grep -c ^processor /proc/cpuinfo)
$b poweroff -f
"""
    write_initramfs(path, init.encode(), Path("/bin/busybox"), [])


class Symbols:
    """The rig kernel's symbols, to name a nokaslr guest's RIP."""

    def __init__(self) -> None:
        rows = []
        for line in Path("/proc/kallsyms").read_text().splitlines():
            addr, kind, name = line.split()[:3]
            if kind in "tTwW" and int(addr, 16):
                rows.append((int(addr, 16), name))
        rows.sort()
        text = next((a for a, n in rows if n == "_text"), LINKED_TEXT)
        self.slide = text - LINKED_TEXT
        self.addrs = [a - self.slide for a, _ in rows]
        self.names = [n for _, n in rows]

    def name(self, rip: int) -> str:
        """symbol+offset for a guest RIP (linked addresses)."""
        i = bisect.bisect_right(self.addrs, rip) - 1
        if i < 0 or rip - self.addrs[i] > 0x10000:
            return f"{rip:#x}"
        return f"{self.names[i]}+{rip - self.addrs[i]:#x}"


def console_end(log: Path) -> tuple[str, float | None]:
    """The console's last non-empty line and the last printk timestamp seen."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln.strip() for ln in text.replace("\r", "").splitlines() if ln.strip()]
    stamps = re.findall(r"^\[\s*(\d+\.\d+)\]", text, re.M)
    return (lines[-1][:160] if lines else ""), (float(stamps[-1]) if stamps else None)


def wait_or_stall(proc: subprocess.Popen, log: Path, timeout: float, stall: float) -> str:
    """Wait for a boot: 'exited', 'stalled' (its console silent for stall s once it has
    printed) or 'timeout'.

    A slow boot on a loaded host still prints; a hung one stops, so the console's silence,
    not the wall time, tells them apart.
    """
    started = last_change = time.monotonic()
    size = -1
    while proc.poll() is None:
        now = time.monotonic()
        grown = log.stat().st_size if log.exists() else 0
        if grown != size:
            size, last_change = grown, now
        # Before its first output a boot is still in firmware (QEMU's SeaBIOS loading the
        # kernel by fw_cfg prints nothing for minutes under nested TCG): only the overall
        # timeout applies there.
        if size > 0 and now - last_change > stall:
            return "stalled"
        if now - started > timeout:
            return "timeout"
        time.sleep(1)
    return "exited"


def boot_pyvmm(kernel: Path, initrd: Path, args, cpus: int, log: Path) -> dict:
    cmd = [sys.executable, "-m", "pyvmm", "run", str(kernel), "--append", args.append,
           "--initrd", str(initrd), "--memory", "512M", "--cpus", str(cpus),
           "--timeout", str(args.timeout), "--serial", f"file:{log}",
           *args.pyvmm_extra]  # fmt: skip
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    ended = wait_or_stall(proc, log, args.timeout + 30, args.stall)
    if ended == "stalled":
        proc.send_signal(signal.SIGINT)  # pyvmm prints every vCPU's registers as it stops
    _, stderr = proc.communicate(timeout=60)
    rips = [int(m, 16) for m in re.findall(r"rip=(0x[0-9a-f]+)", stderr)]
    return {"status": proc.returncode, "rips": rips, "ended": ended, "stderr": stderr}


def monitor(sock: Path, command: str) -> str:
    """Send one command to a QEMU human monitor socket and return what it printed."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        out = b""

        def until_prompt() -> None:
            nonlocal out
            while not out.endswith(b"(qemu) "):
                chunk = s.recv(65536)
                if not chunk:
                    return
                out += chunk

        until_prompt()
        out = b""
        s.sendall(command.encode() + b"\n")
        until_prompt()
    return out.decode(errors="replace")


def boot_qemu(kernel: Path, initrd: Path, args, cpus: int, log: Path) -> dict:
    # Not next to the log: the rig's project tree is 9p, which refuses a socket.
    sock = Path("/tmp") / f"{log.stem}.mon"
    cmd = [QEMU, "-machine", "q35,accel=kvm", "-smp", str(cpus), "-m", "512M",
           "-display", "none", "-no-reboot", "-serial", f"file:{log}",
           "-monitor", f"unix:{sock},server,nowait", "-kernel", str(kernel),
           "-initrd", str(initrd), "-append", args.append, *args.qemu_extra]  # fmt: skip
    if args.device:
        cmd += ["-device", f"vfio-pci,host={args.device}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    rips: list[int] = []
    ended = wait_or_stall(proc, log, args.qemu_timeout or args.timeout, args.stall)
    timed_out = ended != "exited"
    regs = ""
    if timed_out:
        # Three samples a second apart tell a spin (same RIP, IF off) from slow progress.
        for _ in range(3):
            try:
                regs += "".join(
                    monitor(sock, f"cpu {i}") + monitor(sock, "info registers") for i in range(cpus)
                )
            except OSError as error:
                regs += f"(monitor: {error})"
            time.sleep(1)
        rips = [int(m, 16) for m in re.findall(r"RIP=([0-9a-f]+)", regs)]
        # The boot CPU's stack names the code it interrupted (return addresses in it).
        rsp = re.search(r"RSP=([0-9a-f]+)", regs)
        if rsp:
            try:
                regs += monitor(sock, "cpu 0") + monitor(sock, f"x/160gx 0x{rsp.group(1)}")
            except OSError as error:
                regs += f"(monitor: {error})"
        proc.kill()
        proc.wait()
    stderr = (proc.stdout.read() if proc.stdout else b"").decode(errors="replace")
    sock.unlink(missing_ok=True)
    words = [int(w, 16) for w in re.findall(r"0x([0-9a-f]{16})", regs if timed_out else "")]
    return {"status": proc.returncode, "rips": rips, "ended": ended, "stderr": stderr + regs,
            "stack": [w for w in words if KERNEL_TEXT[0] <= w < KERNEL_TEXT[1]]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--boots", type=int, default=15, help="boots per VMM and CPU count")
    ap.add_argument("--vmm", default="pyvmm,qemu")
    ap.add_argument("--cpus", default="1")
    ap.add_argument("--timeout", type=float, default=600, help="a boot's wall-time limit")
    ap.add_argument("--stall", type=float, default=90,
                    help="a boot whose console is silent this long is a hang")  # fmt: skip
    ap.add_argument("--qemu-timeout", type=float, default=0, help="QEMU's, if not --timeout")
    ap.add_argument("--append", default=DEFAULT_APPEND)
    ap.add_argument("--device", default="", help="a PCI address to assign to the guest")
    ap.add_argument("--pyvmm-extra", nargs="*", default=[])
    ap.add_argument("--qemu-extra", nargs="*", default=[])
    ap.add_argument("--tag", default="", help="a name for this setting in the table")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kernel = cache_root() / f"kernel-{kernel_key()}" / "vmlinuz"
    initrd = args.out / "initrd.cpio"
    write_boot_initramfs(initrd)
    symbols = Symbols()
    runners = {"pyvmm": boot_pyvmm, "qemu": boot_qemu}
    configs = [(v, int(c)) for c in args.cpus.split(",") for v in args.vmm.split(",")]
    table: dict[str, list[dict]] = {}
    with open(args.out / "boots.jsonl", "a") as jsonl:
        for n in range(args.boots):
            for vmm, cpus in configs:
                name = f"{args.tag or 'base'}-{vmm}-{cpus}cpu-{n:02d}"
                # The console is written to the rig's tmpfs, not the 9p project tree, so
                # that a slow 9p write can never look like a stalled guest.
                log = Path("/tmp") / f"{name}.console"
                started = time.monotonic()
                row = runners[vmm](kernel, initrd, args, cpus, log)
                last, stamp = console_end(log)
                text = log.read_text(errors="replace") if log.exists() else ""
                (args.out / log.name).write_text(text)
                (args.out / f"{name}.stderr").write_text(row.pop("stderr"))
                row.update(name=name, vmm=vmm, cpus=cpus, tag=args.tag, append=args.append,
                           reached=MARKER in text, wall=round(time.monotonic() - started, 1),
                           last_line=last, last_stamp=stamp,
                           where=[symbols.name(r) for r in row["rips"]],
                           stack=[symbols.name(w) for w in row.get("stack", [])])  # fmt: skip
                jsonl.write(json.dumps(row) + "\n")
                jsonl.flush()
                table.setdefault(f"{args.tag or 'base'} {vmm} {cpus}cpu", []).append(row)
                print(f"{name}: reached={row['reached']} {row['ended']} status={row['status']} "
                      f"wall={row['wall']} last=[{stamp}] {last[:90]!r} where={row['where']}",
                      flush=True)  # fmt: skip
    print("\nsetting | boots | reached initramfs | stalled (console time, where)")
    for key, rows in table.items():
        hangs = [r for r in rows if r["ended"] == "stalled"]
        where = "; ".join(f"{r['last_stamp']} s {','.join(r['where'])}" for r in hangs)
        reached = sum(r["reached"] for r in rows)
        print(f"{key} | {len(rows)} | {reached} | {len(hangs)} {where}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
