"""QEMU's `-device NAME,prop=value,...` spelling, for the emulated devices pyvmm offers.

A QEMU user writes `--device isa-debug-exit,iobase=0xf4,iosize=4` to pyvmm as to QEMU. What
is not an emulated device's name (a PCI address, a sysfs path, an mdev UUID) is a host device
to assign through VFIO, and this module leaves it alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyvmm.errors import ConfigurationError

#: Each emulated device pyvmm offers by QEMU's name, with QEMU's properties and defaults.
EMULATED_DEVICES: dict[str, dict[str, int]] = {
    # hw/misc/debugexit.c: iobase 0x501, iosize 2 unless given.
    "isa-debug-exit": {"iobase": 0x501, "iosize": 0x02},
    # hw/misc/pc-testdev.c: fixed addresses, no properties.
    "pc-testdev": {},
    # hw/misc/pci-testdev.c: membar, the size of an optional BAR 2 (0: none).
    "pci-testdev": {"membar": 0},
}

#: The properties QEMU declares as sizes (DEFINE_PROP_SIZE): they take its size spellings.
SIZE_PROPERTIES = {("pci-testdev", "membar")}

#: qemu_strtosz's spellings: decimal (a fraction only with a suffix) or 0x hex, then
#: optionally B, K, M, G, T, P or E in either case (powers of 1024).
_SIZE = re.compile(r"(0x[0-9a-f]+|[0-9]+(?:\.[0-9]+)?)([bkmgtpe]?)", re.IGNORECASE)
_SIZE_SUFFIXES = "bkmgtpe"


@dataclass(frozen=True)
class DeviceOption:
    """One emulated device as the user spelled it: its name and every property's value."""

    name: str
    properties: dict[str, int]


def is_emulated(text: str) -> bool:
    """Whether a --device argument names an emulated device (else it is a host device)."""
    return text.split(",", 1)[0] in EMULATED_DEVICES


def _integer(device: str, key: str, text: str) -> int:
    # QEMU's integer properties take C's spellings: 0x hex, a leading 0 octal, decimal.
    octal = len(text) > 1 and text[0] == "0" and text[1].isdigit()
    try:
        return int(text, 8) if octal else int(text, 0)
    except ValueError:
        raise ConfigurationError(
            f"--device {device}: {key}={text!r} is not a number (write e.g. {key}=0xf4)"
        ) from None


def _size(device: str, key: str, text: str) -> int:
    match = _SIZE.fullmatch(text)
    number, suffix = match.groups() if match else ("", "")
    if not match or ("." in number and not suffix):
        raise ConfigurationError(
            f"--device {device}: {key}={text!r} is not a size (write e.g. {key}=1M or "
            f"{key}=0x100000)"
        )
    scale = 1024 ** _SIZE_SUFFIXES.index(suffix.lower()) if suffix else 1
    if number.lower().startswith("0x"):
        return int(number, 16) * scale
    whole, _, fraction = number.partition(".")
    # Exact for the fractions of a suffix (1.5M) that a size is written with.
    return int(whole) * scale + int(fraction or "0") * scale // 10 ** len(fraction)


def parse_device_option(text: str) -> DeviceOption:
    """Parse `NAME[,prop=value...]`; an unknown property or a bad value is a one-line error."""
    name, *pairs = text.split(",")
    defaults = EMULATED_DEVICES.get(name)
    if defaults is None:
        raise ConfigurationError(
            f"--device {name}: not an emulated device (pyvmm has {', '.join(EMULATED_DEVICES)})"
        )
    properties = dict(defaults)
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if key not in defaults:
            raise ConfigurationError(
                f"--device {name}: no property {key!r} (it has {', '.join(defaults) or 'none'})"
            )
        if not equals:
            raise ConfigurationError(f"--device {name}: {key} needs a value ({key}=N)")
        parse = _size if (name, key) in SIZE_PROPERTIES else _integer
        properties[key] = parse(name, key, value)
    return DeviceOption(name, properties)
