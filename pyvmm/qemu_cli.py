"""The `pyvmm-qemu` command: a drop-in for the `$QEMU` that test harnesses run.

It takes the qemu-system-x86_64 options such harnesses pass (pyvmm.qemu_options), runs the
kernel on pyvmm, and exits as QEMU would: (v << 1) | 1 after a write of v to isa-debug-exit,
0 on power-off, on a reset or triple fault with -no-reboot, and on SIGINT or SIGTERM; 1 for
any error, with one line on stderr. Without -no-reboot a reset starts the machine again, as
QEMU's does. It answers --version, --help, -device help and -machine help in QEMU's format,
saying it is pyvmm. docs/qemu.md lists where it differs from QEMU.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

from pyvmm import cli
from pyvmm.cpu_features import apply_cpu_features
from pyvmm.devices.options import EMULATED_DEVICES
from pyvmm.errors import ExitStatus, GuestImageError, PyvmmError
from pyvmm.machine import Machine
from pyvmm.qemu_options import DEVICE_BUSES, MACHINES, QemuCommand, parse_qemu_argv

#: The QEMU release whose options and output pyvmm-qemu follows (Debian 12's).
QEMU_VERSION = "7.2.0"
PROGRAM = "pyvmm-qemu"
#: Ways a run can end that QEMU reports as a reset of the machine.
RESETS = ("triple-fault", "reboot", "system-event")

HELP = """\
usage: {program} [options]

{program} is pyvmm's stand-in for qemu-system-x86_64: it runs a -kernel image on pyvmm
(KVM) and takes the subset of QEMU's options below, spelled as QEMU spells them.

Standard options:
-h or -help     display this help and exit
-version        display version information and exit
-machine [type=]pc|q35[,accel=kvm]   (also -M)
-accel kvm      -enable-kvm
-cpu host[,+feature][,-feature][,feature=on|off]
-smp [cpus=]n[,sockets=,cores=,threads=]
-m [size=]megs[k|M|G|T]
-device driver[,prop=value][,...]   ('-device help' for the list)
-global kvm-pit.lost_tick_policy=delay|discard
-nodefaults     -no-reboot

Display and serial:
-display none   -vnc none   -monitor none   -nographic
-serial stdio|mon:stdio|file:PATH|none

Linux/Multiboot boot specific:
-kernel bzImage|multiboot kernel
-append cmdline
-initrd file[,file...]   (multiboot modules, QEMU's syntax)
"""


def version_text() -> str:
    """--version: QEMU's first line, which harnesses parse, then what this really is."""
    try:
        version = metadata.version("pyvmm")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return (
        f"QEMU emulator version {QEMU_VERSION} (pyvmm {version})\n"
        f"{PROGRAM} is pyvmm, a minimal VMM on KVM, taking qemu-system-x86_64's options: "
        "it is not QEMU\n"
    )


def device_help(name: str | None) -> tuple[str, int]:
    """-device help (every device, as QEMU lists them) or -device NAME,help (its properties)."""
    if name is None:
        lines = ["Misc devices:"] + [
            f'name "{device}", {bus}'
            for device, bus in sorted(DEVICE_BUSES.items())
            if device in EMULATED_DEVICES or device == "vfio-pci"
        ]
        return "\n".join(lines) + "\n", 0
    if name == "vfio-pci":
        return "vfio-pci options:\n  host=<str>\n  sysfsdev=<str>\n", 0
    if name not in EMULATED_DEVICES:
        return f"{PROGRAM}: -device {name},help: '{name}' is not a valid device model name\n", 1
    lines = [f"{name} options:"] + [
        f"  {key + '=<uint32>':<23}-  (default: {value})"
        for key, value in sorted(EMULATED_DEVICES[name].items())
    ]
    return "\n".join(lines) + "\n" if len(lines) > 1 else f"There are no options for {name}.\n", 0


def answer_probe(probe: str) -> int:
    """Print the answer to a probe QEMU answers without running (--version, ... help)."""
    if probe == "version":
        sys.stdout.write(version_text())
        return 0
    if probe == "help":
        sys.stdout.write(version_text() + HELP.format(program=PROGRAM))
        return 0
    if probe == "machine-help":
        lines = ["Supported machines are:"]
        lines += [
            f"{name:<20} {description} (pyvmm's PC)" for name, description in MACHINES.items()
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        return 0
    text, status = device_help(probe.partition(":")[2] or None)
    (sys.stdout if status == 0 else sys.stderr).write(text)
    return status


def run_arguments(command: QemuCommand) -> list[str]:
    """The `pyvmm run` arguments that boot what the QEMU command line asks."""
    argv = ["run", command.kernel, f"--memory={command.memory}", f"--cpus={command.cpus}"]
    argv += [f"--serial={command.serial_target}", f"--append={command.append}", "--irqchip"]
    argv += [f"--initrd={entry}" for entry in command.initrd]
    argv += [f"--device={device}" for device in command.devices]
    return argv


def _configure(command: QemuCommand):
    def configure(machine: Machine) -> None:
        machine.remove_default_debug_exit()  # QEMU has a debug exit only where -device puts one
        machine.cpu_features = dict(command.cpu_features)
        # Tell now, as QEMU does at start, which +features the host's KVM cannot give.
        for warning in apply_cpu_features(machine.kvm.supported_cpuid(), command.cpu_features):
            print(f"{PROGRAM}: warning: {warning}", file=sys.stderr)
        if not command.pit_reinject:
            machine.vm.set_pit_reinject(False)

    return configure


def qemu_status(command: QemuCommand, outcome: str, status: int) -> int | None:
    """The status QEMU exits with after a run that ended so; None: QEMU resets and goes on."""
    if outcome in ("exit", "halted"):
        return status & 0xFF
    if outcome in RESETS:
        return 0 if command.no_reboot else None
    if status == ExitStatus.SIGNALLED:
        return 0  # QEMU: "terminating on signal N", then a clean exit
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the pyvmm-qemu console script."""
    try:
        command = parse_qemu_argv(sys.argv[1:] if argv is None else argv)
        if command.probe is not None:
            return answer_probe(command.probe)
        if not os.path.isfile(command.kernel):
            raise GuestImageError(
                f"-kernel {command.kernel}: could not open kernel file: no such file"
            )
        args = cli.build_parser().parse_args(run_arguments(command))
        while True:
            result = cli.run_guest(args, _configure(command))
            status = qemu_status(command, result.outcome, result.exit_status)
            if status is not None:
                if result.exit_status == ExitStatus.SIGNALLED:
                    print(f"{PROGRAM}: terminating on signal ({result.message})", file=sys.stderr)
                return status
            print(
                f"{PROGRAM}: resetting the machine (QEMU does; -no-reboot stops instead)",
                file=sys.stderr,
            )
    except PyvmmError as error:
        print(f"{PROGRAM}: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROGRAM}: terminating on signal 2", file=sys.stderr)
        return 0
    except Exception as error:  # a bug in pyvmm: one line, as pyvmm run gives it
        detail = " ".join(str(error).split())
        print(f"{PROGRAM}: internal error: {type(error).__name__}: {detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
