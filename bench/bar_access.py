"""What one access to an assigned device's BAR costs: mapped into the guest, or trapped.

    python -m tests.rig -- python bench/bar_access.py [--repeat R] [--device BDF]

Runs inside the nested rig (it needs VFIO and edu, $PYVMM_RIG_EDU). The guest is
`edu_regs`: exactly 3000 register accesses to edu's BAR0 and no other MMIO. It runs with the
BAR mapped as a KVM memory slot (no exits) and trapped (`mmap=False`: each access an MMIO
exit served by pread/pwrite in the C loop), and the reference, measured in the same run, is
the same 3000 accesses made by the host itself with pread/pwrite on the VFIO device fd.

Cost per access = (time of the run with the accesses - time of a run of `hello`, which
does none) / 3000, best of R. Inside the rig everything runs under TCG, so the absolute
numbers are far from hardware; the exit counts (always 0 and 3000) and the ratios are the
result. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pyvmm import Machine, guest_path
from pyvmm.pci.config import COMMAND, COMMAND_MEMORY

ACCESSES = 3000


def timed_run(guest: str, device: str, mmap: bool) -> tuple[float, int, int]:
    """(elapsed seconds, exits, MMIO exits) of one run of guest with device assigned."""
    with Machine(memory="16M", serial="capture") as machine:
        machine.load(guest_path(guest))
        machine.assign(device, mmap=mmap)
        result = machine.run(timeout=600)
    if result.exit_status != 0:
        raise SystemExit(f"{guest} failed: {result.message}\n{result.serial_text}")
    return result.elapsed, result.exits, result.exit_reasons.get("MMIO", 0)


def host_reference(device: str) -> float:
    """Seconds for the host itself to make edu_regs' 3000 accesses through the device fd."""
    with Machine(memory="16M", serial="capture") as machine:
        assigned = machine.assign(device)
        assigned.config_write(COMMAND, 2, COMMAND_MEMORY)  # as the guest does first
        fd, offset = assigned.device.fd, assigned.bars[0].region.offset
        started = time.perf_counter()
        for _ in range(ACCESSES // 3):
            os.pread(fd, 4, offset)
        for i in range(ACCESSES // 3):
            os.pwrite(fd, (i * 0x9E3779B9 & 0xFFFFFFFF).to_bytes(4, "little"), offset + 4)
            os.pread(fd, 4, offset + 4)
        return time.perf_counter() - started


def main() -> int:
    """Measure and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", "-r", type=int, default=5)
    parser.add_argument("--device", default=os.environ.get("PYVMM_RIG_EDU"))
    args = parser.parse_args()
    if not args.device:
        print(json.dumps({"skipped": True, "reason": "no edu: run inside the rig"}))
        return 0
    best: dict[str, float] = {}
    exits: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeat):
        for row, guest, mmap in (
            ("empty", "hello", True),
            ("mapped", "edu_regs", True),
            ("trapped", "edu_regs", False),
        ):
            elapsed, total, mmio = timed_run(guest, args.device, mmap)
            best[row] = min(best.get(row, elapsed), elapsed)
            exits[row] = (total, mmio)
        reference = host_reference(args.device)
        best["host"] = min(best.get("host", reference), reference)
    per_access = {
        row: (best[row] - best["empty"]) / ACCESSES * 1e6 for row in ("mapped", "trapped")
    }
    per_access["host"] = best["host"] / ACCESSES * 1e6
    print(f"{'row':8} {'µs/access':>10} {'exits':>6} {'MMIO exits':>10}")
    for row in ("mapped", "trapped"):
        total, mmio = exits[row]
        print(f"{row:8} {per_access[row]:10.2f} {total:6d} {mmio:10d}")
    print(f"{'host':8} {per_access['host']:10.2f}      -          -   (pread/pwrite, no guest)")
    summary = {
        "mapped_us": round(per_access["mapped"], 3),
        "trapped_us": round(per_access["trapped"], 3),
        "host_pread_us": round(per_access["host"], 3),
        "trapped_over_host": round(per_access["trapped"] / per_access["host"], 2),
        "mapped_mmio_exits": exits["mapped"][1],
        "trapped_mmio_exits": exits["trapped"][1],
        "repeat": args.repeat,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
