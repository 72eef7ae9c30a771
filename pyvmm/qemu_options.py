"""QEMU's command line, the subset test harnesses pass, read into what pyvmm should run.

`qemu-system-x86_64 -kernel K -append A -smp 2 -m 256 -device isa-debug-exit ...` becomes a
QemuCommand; pyvmm.qemu_cli runs it. Spellings are QEMU's: single-dash long options (a
double dash works too), `-opt value`, and `key=value,...` suboptions with an optional
leading implied key (`-machine q35,accel=kvm`, `-smp 2,cores=2`). Anything else is refused
in one line that names it, as QEMU refuses what it does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pyvmm.cpu_features import parse_cpu_option
from pyvmm.devices.options import is_emulated
from pyvmm.errors import ConfigurationError

#: Options that take a value, and those that take none.
WITH_VALUE = {
    "kernel", "append", "initrd", "smp", "m", "machine", "M", "accel", "cpu", "display",
    "serial", "global", "device", "vnc", "monitor", "name",
}  # fmt: skip
FLAGS = {"nodefaults", "nographic", "no-reboot", "enable-kvm", "version", "help", "h"}

#: `-device NAME` lines of `-device help` for what pyvmm offers beside the emulated devices'
#: registry, and each device's bus and description as QEMU lists them.
DEVICE_BUSES = {
    "isa-debug-exit": "bus ISA",
    "pc-testdev": "bus ISA",
    "pci-testdev": 'bus PCI, desc "PCI Test Device"',
    "vfio-pci": 'bus PCI, desc "VFIO-based PCI device assignment"',
}
MACHINES = {"pc": "Standard PC (i440FX + PIIX, 1996)", "q35": "Standard PC (Q35 + ICH9, 2009)"}
_SIZE = re.compile(r"^(\d+)([kKMGT]?)[bB]?$")
_UNITS = {"": 1 << 20, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class QemuOptionError(ConfigurationError):
    """A QEMU option pyvmm-qemu refuses or cannot read; its message names the option."""


@dataclass
class QemuCommand:
    """What a qemu-system-x86_64 command line asks of the machine, in pyvmm's terms."""

    kernel: str | None = None
    append: str = ""
    initrd: list[str] = field(default_factory=list)
    cpus: int = 1
    memory: int = 128 << 20  # QEMU's default -m
    serial: str | None = None  # None until -serial or -nographic says where
    nographic: bool = False
    no_reboot: bool = False
    devices: list[str] = field(default_factory=list)  # pyvmm `--device` arguments
    cpu_features: dict[str, bool] = field(default_factory=dict)
    pit_reinject: bool = True
    probe: str | None = None  # "version", "help", "device-help", "machine-help", ...

    @property
    def serial_target(self) -> str:
        """pyvmm's --serial: QEMU's COM1 goes to stdio with -nographic, else nowhere."""
        if self.serial is not None:
            return self.serial
        return "stdio" if self.nographic else "none"


def suboptions(option: str, text: str, implied: str) -> dict[str, str]:
    """Split `value,key=value,...`; a first item without '=' is the implied key's value."""
    result: dict[str, str] = {}
    for position, item in enumerate(text.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            if position or not item:
                raise QemuOptionError(f"-{option} {text}: {item!r} needs a value ({item}=...)")
            key, value = implied, item
        result[key] = value
    return result


def parse_memory(text: str) -> int:
    """QEMU's -m: a size in MiB unless it has a suffix (k, M, G, T), or size=SIZE."""
    values = suboptions("m", text, "size")
    extra = sorted(set(values) - {"size"})
    if extra:
        raise QemuOptionError(f"-m {text}: pyvmm-qemu has no memory hotplug ({extra[0]}=)")
    match = _SIZE.match(values.get("size", ""))
    if not match or int(match.group(1)) == 0:
        raise QemuOptionError(
            f"-m {text}: Parameter 'size' expects a non-negative number with an optional "
            "suffix k, M, G or T"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_smp(text: str) -> int:
    """QEMU's -smp: N, cpus=N, or a topology (sockets, dies, cores, threads) to multiply."""
    values = suboptions("smp", text, "cpus")
    known = {"cpus", "maxcpus", "sockets", "dies", "cores", "threads"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise QemuOptionError(f"-smp {text}: no property {unknown[0]!r}")
    try:
        numbers = {key: int(value, 0) for key, value in values.items()}
    except ValueError:
        raise QemuOptionError(f"-smp {text}: not a number of CPUs") from None
    if "cpus" in numbers:
        return numbers["cpus"]
    product = 1
    for key in ("sockets", "dies", "cores", "threads"):
        product *= numbers.get(key, 1)
    return product


def _machine(command: QemuCommand, text: str) -> None:
    if text in ("help", "?"):
        command.probe = "machine-help"
        return
    values = suboptions("machine", text, "type")
    machine = values.pop("type", "pc")
    if machine not in MACHINES and not machine.startswith(("pc-i440fx-", "pc-q35-")):
        raise QemuOptionError(f"-machine {text}: unsupported machine type {machine!r} (pc, q35)")
    if "accel" in values:
        _accel(values.pop("accel"))
    if values.pop("kernel_irqchip", "on") not in ("on", "true"):
        raise QemuOptionError(f"-machine {text}: pyvmm always uses KVM's in-kernel irqchip")
    if values:
        raise QemuOptionError(f"-machine {text}: pyvmm-qemu has no property {next(iter(values))!r}")


def _accel(text: str) -> None:
    if "kvm" not in text.split(",")[0].split(":"):
        raise QemuOptionError(f"-accel {text}: pyvmm runs guests on KVM only: use accel=kvm")


def _device(command: QemuCommand, text: str) -> None:
    name, _, rest = text.partition(",")
    if name in ("help", "?"):
        command.probe = "device-help"
    elif rest in ("help", "?"):
        command.probe = f"device-help:{name}"
    elif name == "vfio-pci":
        values = suboptions("device", rest, "host") if rest else {}
        host = values.pop("host", None) or values.pop("sysfsdev", None)
        values.pop("id", None)
        if host is None or values:
            raise QemuOptionError(
                f"-device {text}: pyvmm-qemu takes vfio-pci,host=DDDD:BB:DD.F or sysfsdev=PATH"
            )
        command.devices.append(host)
    elif is_emulated(name):
        command.devices.append(text)  # pyvmm's --device takes QEMU's spelling as it is
    else:
        raise QemuOptionError(f"-device {text}: '{name}' is not a valid device model name")


def _serial(command: QemuCommand, text: str) -> None:
    targets = {"stdio": "stdio", "mon:stdio": "stdio", "none": "none", "null": "none"}
    if command.serial is not None and text not in ("none", "null"):
        raise QemuOptionError(f"-serial {text}: pyvmm has one UART (COM1)")
    if text in targets:
        command.serial = command.serial or targets[text]
    elif text.startswith("file:"):
        command.serial = text
    else:
        raise QemuOptionError(f"-serial {text}: pyvmm-qemu takes stdio, file:PATH or none")


def _global(command: QemuCommand, text: str) -> None:
    name, _, value = text.partition("=")
    if name != "kvm-pit.lost_tick_policy":
        raise QemuOptionError(f"-global {text}: pyvmm-qemu has only kvm-pit.lost_tick_policy")
    if value not in ("delay", "discard"):
        raise QemuOptionError(f"-global {text}: lost_tick_policy is delay or discard")
    command.pit_reinject = value == "delay"  # QEMU's kvm-pit: delay = KVM reinjects


def _none_only(option: str, text: str, what: str) -> None:
    if text != "none":
        raise QemuOptionError(f"-{option} {text}: pyvmm has no {what}: use -{option} none")


def _apply(command: QemuCommand, option: str, value: str) -> None:
    if option == "kernel":
        command.kernel = value
    elif option == "append":
        command.append = value
    elif option == "initrd":
        command.initrd.append(value)
    elif option == "smp":
        command.cpus = parse_smp(value)
    elif option == "m":
        command.memory = parse_memory(value)
    elif option in ("machine", "M"):
        _machine(command, value)
    elif option == "accel":
        _accel(value)
    elif option == "cpu":
        model, command.cpu_features = parse_cpu_option(value)
        if model not in ("host", "max"):
            raise QemuOptionError(f"-cpu {value}: pyvmm offers the host's CPU only: use -cpu host")
    elif option == "device":
        _device(command, value)
    elif option == "serial":
        _serial(command, value)
    elif option == "global":
        _global(command, value)
    elif option == "display":
        _none_only(option, value, "display")
    elif option == "vnc":
        _none_only(option, value, "VNC server")
    elif option == "monitor":
        _none_only(option, value, "monitor")
    # -name only labels the VM in QEMU's window and logs: nothing to do.


def parse_qemu_argv(argv: list[str]) -> QemuCommand:
    """Read qemu-system-x86_64's argv (without the program name) into a QemuCommand."""
    command = QemuCommand()
    arguments = iter(argv)
    for argument in arguments:
        if not argument.startswith("-") or argument == "-":
            raise QemuOptionError(f"{argument}: pyvmm-qemu boots -kernel images and has no disks")
        option = argument[2:] if argument.startswith("--") else argument[1:]
        if option in FLAGS:
            if option in ("version", "help", "h"):
                command.probe = "help" if option == "h" else option
            elif option == "nographic":
                command.nographic = True
            elif option == "no-reboot":
                command.no_reboot = True
            # -nodefaults: pyvmm adds none of the NIC, VGA or disks QEMU adds by default.
            # -enable-kvm: pyvmm always runs on KVM.
            continue
        if option not in WITH_VALUE:
            raise QemuOptionError(f"{argument}: invalid option")
        value = next(arguments, None)
        if value is None:
            raise QemuOptionError(f"{argument}: requires an argument")
        _apply(command, option, value)
    if command.probe is None and command.kernel is None:
        raise QemuOptionError("no -kernel: pyvmm-qemu boots a kernel given with -kernel FILE")
    return command
