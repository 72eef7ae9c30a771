"""isa-debug-exit with QEMU's iobase and iosize, spelled as QEMU's -device spells it.

mb_debug_exit writes a value to the port its command line names; the same kernel and the
same device option run under QEMU (the reference) and under pyvmm, and the output and exit
status must agree. Without QEMU only pyvmm's side runs, against QEMU's outcome written down.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm import guest_path
from pyvmm.devices.options import is_emulated, parse_device_option
from pyvmm.errors import ConfigurationError

TIMEOUT = 60
DEVICE = "isa-debug-exit,iobase=0x501,iosize=2"
#: (command line, exit status under QEMU 7.2): an offset within iosize and any width end the
#: run; a port outside the device, or the default 0xF4 once the device moved, does not.
CASES = [
    ("port=0x501 value=5 width=2", 11),
    ("port=0x502 value=7 width=1", 15),
    ("port=0x501 value=0 width=4", 1),
    ("port=0x503 value=5", 0),
    ("port=0xf4 value=3", 0),
]


def test_qemu_defaults_and_spellings():
    assert parse_device_option("isa-debug-exit").properties == {"iobase": 0x501, "iosize": 2}
    assert parse_device_option("isa-debug-exit,iobase=0xf4,iosize=0x04").properties == {
        "iobase": 0xF4, "iosize": 4,
    }  # fmt: skip
    assert parse_device_option("isa-debug-exit,iobase=244,iosize=04").properties["iobase"] == 244
    assert is_emulated("isa-debug-exit,iobase=1") and not is_emulated("0000:00:02.0")


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("isa-debug-exit,size=2", "no property 'size' (it has iobase, iosize)"),
        ("isa-debug-exit,iobase=zz", "iobase='zz' is not a number"),
        ("isa-debug-exit,iobase", "iobase needs a value"),
    ],
)
def test_bad_properties_name_the_problem(option, words):
    with pytest.raises(ConfigurationError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_device_option(option)


@given(st.integers(0, 0xFFFF), st.integers(1, 16), st.sampled_from(["{:#x}", "{:d}", "{:#o}"]))
def test_any_spelling_of_a_number_parses_to_it(iobase, iosize, spelling):
    text = spelling.format(iobase).replace("0o", "0") if iobase else "0"
    option = parse_device_option(f"isa-debug-exit,iobase={text},iosize={iosize}")
    assert option.properties == {"iobase": iobase, "iosize": iosize}


def run_qemu(append: str) -> subprocess.CompletedProcess:
    command = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", "-cpu",
        "host,-arch-capabilities", "-m", "64M", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-device", DEVICE, "-kernel", str(guest_path("mb_debug_exit")),
        "-append", append,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(("append", "status"), CASES)
def test_same_outcome_as_qemu(pyvmm_cli, append, status):
    ours = pyvmm_cli(
        "run", "mb_debug_exit", "--device", DEVICE, "--append", append,
        "--timeout", str(TIMEOUT), timeout=TIMEOUT + 30,
    )  # fmt: skip
    assert ours.returncode == status, ours.stdout + ours.stderr
    assert "Traceback" not in ours.stderr
    if shutil.which("qemu-system-x86_64"):
        qemu = run_qemu(append)
        assert (ours.stdout, ours.returncode) == (qemu.stdout, qemu.returncode), qemu.stderr


@pytest.mark.usefixtures("kvm_required")
def test_a_bad_property_is_one_line_and_status_2(pyvmm_cli):
    ours = pyvmm_cli("run", "mb_debug_exit", "--device", "isa-debug-exit,size=2", timeout=60)
    assert ours.returncode == 2
    assert ours.stderr.strip().splitlines() == [
        "pyvmm: --device isa-debug-exit: no property 'size' (it has iobase, iosize)"
    ]
