"""The host-device commands: `pyvmm devices`, `pyvmm bind DEV`, `pyvmm unbind DEV`.

`devices` lists every PCI device and mdev with whether it can be assigned (`--device DEV`) and,
for each one that cannot, the command that fixes it; `--json` prints a JSON list instead.
`bind` moves a PCI device to vfio-pci, `unbind` gives it back to the host; both print the
resulting state in one line.

pyvmm.cli hooks these in with add_parsers(). Until then, or standalone:
``python -m pyvmm.hostcli devices``.

Test roots: every subcommand takes the hidden options ``--sysfs DIR`` and ``--dev DIR``
(default /sys and /dev), so that the tests can run the commands on a fake tree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.hostdev import DeviceReport, bind, find_device, list_devices, report, unbind

_DEV_HELP = (
    "PCI address (0000:00:02.0 or 00:02.0), sysfs device path (/sys/bus/pci/devices/...,"
    " /sys/devices/..., /sys/bus/mdev/devices/UUID) or mdev UUID"
)
_COLUMNS = ("NAME", "IDS/TYPE", "DRIVER", "GROUP", "VIABLE", "CDEV", "ASSIGNABLE")


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def _row(found: DeviceReport) -> tuple[str, ...]:
    d = found.device
    ids = d.mdev_type if d.is_mdev else f"{d.vendor or 0:04x}:{d.device or 0:04x}"
    return (
        d.name,
        ids or "-",
        d.driver or "-",
        "-" if d.iommu_group is None else str(d.iommu_group),
        _yes_no(found.viable),
        found.cdev.name if found.cdev else "-",
        _yes_no(found.assignable),
    )


def format_table(reports: list[DeviceReport]) -> str:
    """The `pyvmm devices` table; a `fix:` line follows each device that is not assignable."""
    rows = [_COLUMNS, *(_row(found) for found in reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(rows[0], widths, strict=True)).rstrip()]
    for found, row in zip(reports, rows[1:], strict=True):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if not found.assignable:
            # The reason as a shell comment: the line stays one command to copy.
            lines.append(f"    fix: {found.fix or 'none'}  # {found.reason}")
    return "\n".join(lines)


def state_line(found: DeviceReport) -> str:
    """One line on a device's state, as bind and unbind print it."""
    d = found.device
    group = "no IOMMU group" if d.iommu_group is None else f"IOMMU group {d.iommu_group}"
    if found.viable is False:
        group += " (not viable)"
    cdev = f"cdev {found.cdev}" if found.cdev else "no cdev"
    ready = "assignable" if found.assignable else f"not assignable: {found.reason}"
    return f"{d.name} ({found.description}): driver {d.driver or 'none'}, {group}, {cdev}, {ready}"


def devices_command(args: argparse.Namespace) -> int:
    """`pyvmm devices`: print the table (or JSON) of host devices; exit status 0."""
    reports = list_devices(args.sysfs, args.dev)
    if args.json:
        print(json.dumps([found.to_json() for found in reports], indent=2))
    elif reports:
        print(format_table(reports))
    else:
        print(f"no PCI devices or mdevs under {args.sysfs}")
    return 0


def bind_command(args: argparse.Namespace) -> int:
    """`pyvmm bind DEV`: move the device to vfio-pci and print its new state."""
    device = bind(args.device, args.sysfs)
    print(state_line(report(find_device(device.name, args.sysfs, args.dev), args.sysfs, args.dev)))
    return 0


def unbind_command(args: argparse.Namespace) -> int:
    """`pyvmm unbind DEV`: give the device back to the host and print its new state."""
    device = unbind(args.device, args.sysfs)
    print(state_line(report(find_device(device.name, args.sysfs, args.dev), args.sysfs, args.dev)))
    return 0


def _add_roots(parser: argparse.ArgumentParser) -> None:
    # Hidden: only the tests point these at a fake tree.
    parser.add_argument("--sysfs", type=Path, default=Path("/sys"), help=argparse.SUPPRESS)
    parser.add_argument("--dev", type=Path, default=Path("/dev"), help=argparse.SUPPRESS)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add the devices, bind and unbind subcommands; each sets func=(args) -> exit status."""
    devices = commands.add_parser(
        "devices", help="list host PCI devices and mdevs, whether they can be assigned, and fixes"
    )
    devices.add_argument("--json", action="store_true", help="print a JSON list instead")
    devices.set_defaults(func=devices_command)
    bind_parser = commands.add_parser("bind", help="move a PCI device to vfio-pci (as root)")
    bind_parser.set_defaults(func=bind_command)
    unbind_parser = commands.add_parser(
        "unbind", help="release a PCI device from vfio-pci back to its host driver (as root)"
    )
    unbind_parser.set_defaults(func=unbind_command)
    for parser in (bind_parser, unbind_parser):
        parser.add_argument("device", metavar="DEV", help=_DEV_HELP)
    for parser in (devices, bind_parser, unbind_parser):
        _add_roots(parser)


def main(argv: list[str] | None = None) -> int:
    """Run one of these commands standalone; errors print one `pyvmm: ` line."""
    parser = argparse.ArgumentParser(prog="pyvmm", description="Host devices for VFIO assignment.")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PyvmmError as error:
        print(f"pyvmm: {error.message}", file=sys.stderr)
        return int(error.exit_status)


if __name__ == "__main__":
    sys.exit(main())
