"""The `pyvmm` command: boot a guest, print what it said, exit with its status.

Failures print one line on stderr (plus a register dump when the guest crashed) and exit
with the distinct status listed by `pyvmm run --help`; never a traceback for user errors.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.boot import BootProtocol
from pyvmm.devices.options import is_emulated
from pyvmm.errors import ExitStatus, PyvmmError
from pyvmm.guests import guest_path
from pyvmm.hostcli import add_parsers as add_device_parsers
from pyvmm.ioctl import trace_to
from pyvmm.multiboot import split_module_list
from pyvmm.x86 import CpuMode

if TYPE_CHECKING:
    from pyvmm.machine import Machine
    from pyvmm.result import RunResult

_STATUSES = "\n".join(
    f"  {status.value:3d}  {status.name.lower().replace('_', ' ')}"
    for status in ExitStatus
    if status is not ExitStatus.OK
)
EPILOG = f"""exit status: 0 or (v << 1) | 1 when the guest ends itself (power-off, or a write of v
to isa-debug-exit at port 0xF4); otherwise one of:
{_STATUSES}"""


def timeout_seconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite, non-negative number of seconds: leave --timeout out "
            "to run without one"
        )
    return seconds


def serial_target(text: str) -> str:
    """An argparse type: the UART targets the command line offers (capture is the API's)."""
    if text == "capture":
        raise argparse.ArgumentTypeError(
            "capture is for the Python API: use stdio, file:PATH or none"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the pyvmm command."""
    parser = argparse.ArgumentParser(prog="pyvmm", description="A minimal VMM on Linux KVM.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="boot a guest image",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "guest",
        nargs="?",
        default=None,
        help="guest image (ELF, or a multiboot kernel) or bundled guest name (default: hello)",
    )
    run.add_argument("--memory", default="64M", help="guest RAM, e.g. 64M or 4G (default 64M)")
    run.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument(
        "--serial",
        type=serial_target,
        default="stdio",
        help="UART output: stdio, file:PATH or none (default stdio)",
    )
    run.add_argument(
        "--timeout", type=timeout_seconds, default=None, help="stop the guest after S seconds"
    )
    run.add_argument(
        "--boot",
        choices=[protocol.value for protocol in BootProtocol],
        help="boot protocol (default: from the image: linux for a bzImage, multiboot if it has a "
        "multiboot header, else elf, pyvmm's own entry ABI)",
    )
    run.add_argument(
        "--append",
        default="",
        metavar="TEXT",
        help="kernel command line (multiboot: the kernel gets 'GUEST TEXT', as from QEMU; "
        "Linux: TEXT)",
    )
    run.add_argument(
        "--initrd",
        action="append",
        default=[],
        metavar="FILE[,FILE...]",
        help="multiboot modules, in order (an entry 'FILE ARGS' gives the module a command "
        "line, ',,' is a comma: QEMU's -initrd syntax; repeatable), or a Linux kernel's one "
        "initrd",
    )
    run.add_argument(
        "--mode",
        choices=[mode.value for mode in CpuMode],
        help="CPU mode at entry of an ELF guest (default: long for ELF64, protected for ELF32; "
        "multiboot kernels start in protected mode)",
    )
    run.add_argument(
        "--firmware",
        nargs="?",
        const=True,
        metavar="PATH",
        help="boot through pyvmm's own firmware (firmware/), from the reset vector, instead of "
        "entering the guest directly; PATH is a firmware image (default: the bundled one). "
        "With no GUEST after it, 'pyvmm run --firmware GUEST' boots GUEST with the bundled one",
    )
    run.add_argument("--kvm-device", default="/dev/kvm", help="KVM device node (default /dev/kvm)")
    run.add_argument("--irqchip", action="store_true", help="create the in-kernel irqchip and PIT")
    run.add_argument(
        "--fail-on-unclaimed",
        action="store_true",
        help="stop the guest at its first access to an unclaimed port or MMIO address",
    )
    run.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="DEV",
        help="assign a host device through VFIO: PCI address (0000:00:02.0), sysfs path or "
        "mdev UUID (turns on --irqchip); or add an emulated device as QEMU spells it: "
        "isa-debug-exit[,iobase=N][,iosize=N], pc-testdev, pci-testdev (repeatable)",
    )
    run.add_argument(
        "--vfio",
        choices=("auto", "cdev", "group"),
        default="auto",
        help="VFIO path: cdev (device cdev + iommufd), group (container/group), or auto "
        "(cdev where the kernel has it; the default)",
    )
    run.add_argument(
        "--no-mmap",
        action="store_true",
        help="trap every BAR access (served in C) instead of mapping BARs into the guest",
    )
    run.add_argument(
        "--trace",
        action="store_true",
        help="print every KVM, VFIO and iommufd ioctl pyvmm issues on stderr, in order",
    )
    run.add_argument(
        "--stats",
        action="store_true",
        help="print exits by reason and accesses by port/MMIO range at the end, on stderr",
    )
    run.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an internal error (so does PYVMM_DEBUG=1)",
    )
    add_device_parsers(commands)
    return parser


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def run_command(args: argparse.Namespace) -> int:
    """Boot the guest as asked and return the process exit status."""
    return run_guest(args).exit_status & 0xFF


def run_guest(
    args: argparse.Namespace, configure: Callable[[Machine], None] | None = None
) -> RunResult:
    """Boot the guest as `pyvmm run` args ask, report on stderr, and return how it ended.

    configure, if given, sees the machine once the guest and devices are in, before it runs
    (pyvmm-qemu sets CPU features and the PIT's tick policy there).
    """
    from pyvmm.machine import Machine

    if args.trace:
        trace_to(sys.stderr)
    if args.guest is None:
        # "pyvmm run --firmware KERNEL": the one path given names the guest, not a firmware.
        if isinstance(args.firmware, str):
            args.guest, args.firmware = args.firmware, True
        else:
            args.guest = "hello"
    with Machine(
        memory=args.memory,
        cpus=args.cpus,
        serial=args.serial,
        irqchip=args.irqchip or any(not is_emulated(device) for device in args.device),
        fail_on_unclaimed=args.fail_on_unclaimed,
        kvm_path=args.kvm_device,
        firmware=args.firmware,
    ) as machine:
        image = guest_path(args.guest)
        # A path given as a path is passed as typed: a multiboot kernel sees it in its
        # command line, as under QEMU.
        machine.load(
            args.guest if image == Path(args.guest) else image,
            args.mode,
            boot=args.boot,
            # The command line is passed as the bytes typed, UTF-8 or not, as QEMU does.
            append=os.fsencode(args.append),
            initrd=[entry for value in args.initrd for entry in split_module_list(value)],
        )
        for warning in machine.boot.warnings:
            print(f"pyvmm: warning: {warning}", file=sys.stderr)
        for device in args.device:
            if is_emulated(device):
                machine.add_device(device)
            else:
                machine.assign(device, vfio=args.vfio, mmap=not args.no_mmap)
        if configure is not None:
            configure(machine)
        if args.serial == "stdio" and _is_open(0):
            machine.serial.start_input(0)
        result = machine.run(timeout=args.timeout)
    sys.stdout.flush()
    if result.outcome not in ("exit", "halted"):
        print(f"pyvmm: {result.message}", file=sys.stderr)
        if result.registers:
            print(result.registers, file=sys.stderr)
    if result.serial_dropped:
        print(
            f"pyvmm: warning: {result.serial_dropped} bytes of serial output dropped:"
            " the reader of stdout stopped reading",
            file=sys.stderr,
        )
    if args.stats:
        for line in result.stats_lines():
            print(f"pyvmm: stats: {line}", file=sys.stderr)
    for assigned in machine.assigned:  # what the guest asked of a device that was refused
        for warning in assigned.warning_lines():
            print(f"pyvmm: warning: {warning}", file=sys.stderr)
    if result.outcome != "unclaimed":
        for space, record in (("port", result.unclaimed_pio), ("MMIO", result.unclaimed_mmio)):
            if record.count:
                print(f"pyvmm: warning: {record.describe(space)}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of the pyvmm console script."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("PYVMM_DEBUG", "") not in ("", "0")
    try:
        if args.command != "run":
            return args.func(args)
        return run_command(args)
    except PyvmmError as error:
        print(f"pyvmm: {error.message}", file=sys.stderr)
        return int(error.exit_status)
    except BrokenPipeError:
        # The reader went away (`pyvmm devices | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # Ctrl-C before or after a run (a run itself turns SIGINT into its result).
        print("pyvmm: interrupted (SIGINT)", file=sys.stderr)
        return int(ExitStatus.SIGNALLED)
    except Exception as error:
        if debug:
            traceback.print_exc()
        detail = " ".join(str(error).split())
        print(
            f"pyvmm: internal error: {type(error).__name__}: {detail} (run with --debug for the "
            "traceback; please report it)",
            file=sys.stderr,
        )
        return int(ExitStatus.INTERNAL_BUG)


if __name__ == "__main__":
    sys.exit(main())
