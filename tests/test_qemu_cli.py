"""pyvmm-qemu, the drop-in for `$QEMU`: QEMU's options read as QEMU reads them, and the same
kernel with the same argv run under qemu-system-x86_64 and under pyvmm-qemu side by side.

The parsing tests are pure logic. The side-by-side tests need /dev/kvm, and QEMU (which
.ci/run installs) for the reference; without QEMU they check pyvmm's side alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm import guest_path
from pyvmm.cpu_features import FEATURES, parse_cpu_option
from pyvmm.errors import ConfigurationError
from pyvmm.qemu_cli import qemu_status
from pyvmm.qemu_options import QemuCommand, parse_memory, parse_qemu_argv, parse_smp

TIMEOUT = 60
QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (the reference)")
#: What every side-by-side run passes to both. QEMU's `-cpu host` may fail to set MSR 0x10A
#: on some hosts; -arch-capabilities avoids it, and pyvmm-qemu takes the same flag.
COMMON = ["-machine", "q35,accel=kvm", "-nodefaults", "-display", "none", "-serial", "stdio"]
HOST_CPU = "host,-arch-capabilities"


def pyvmm_qemu(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm.qemu_cli", *argv],
        capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def qemu(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [QEMU, *argv], capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL
    )


def test_a_harness_command_line_maps_onto_pyvmm():
    words = (
        "-nodefaults -device isa-debug-exit -device isa-debug-exit,iobase=0xf4,iosize=0x4 "
        "-vnc none -serial stdio -machine accel=kvm -kernel k.elf -smp 2 -m 256 "
        "--no-reboot -cpu host,+x2apic,-avx2 -global kvm-pit.lost_tick_policy=discard "
        "-device vfio-pci,host=00:02.0"
    )
    command = parse_qemu_argv([*words.split(), "-append", "a b -c", "-initrd", "m1 arg,m2"])
    assert (command.kernel, command.append, command.initrd) == ("k.elf", "a b -c", ["m1 arg,m2"])
    assert (command.cpus, command.memory, command.serial_target) == (2, 256 << 20, "stdio")
    assert command.no_reboot and not command.pit_reinject
    assert command.cpu_features == {"x2apic": True, "avx2": False}
    assert command.devices == [
        "isa-debug-exit", "isa-debug-exit,iobase=0xf4,iosize=0x4", "00:02.0",
    ]  # fmt: skip


def test_serial_goes_where_qemu_sends_com1():
    assert parse_qemu_argv(["-kernel", "k"]).serial_target == "none"  # QEMU's vc, no window
    assert parse_qemu_argv(["-nographic", "-kernel", "k"]).serial_target == "stdio"
    assert parse_qemu_argv(["-serial", "file:/tmp/x", "-kernel", "k"]).serial_target == (
        "file:/tmp/x"
    )


@pytest.mark.parametrize(
    ("text", "size"),
    [("128", 128 << 20), ("1G", 1 << 30), ("512M", 512 << 20), ("size=64M", 64 << 20),
     ("65536k", 64 << 20)],
)  # fmt: skip
def test_memory_sizes_are_mebibytes_unless_suffixed(text, size):
    assert parse_memory(text) == size


@given(st.integers(1, 1 << 16), st.sampled_from(["", "k", "K", "M", "G"]))
def test_any_memory_spelling_parses(number, suffix):
    unit = {"": 1 << 20, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[suffix]
    assert parse_memory(f"{number}{suffix}") == number * unit


@pytest.mark.parametrize(
    ("text", "cpus"), [("2", 2), ("cpus=3", 3), ("sockets=2,cores=2", 4), ("4,cores=2", 4)]
)
def test_smp_counts_cpus_as_qemu_does(text, cpus):
    assert parse_smp(text) == cpus


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["-foo"], "-foo: invalid option"),
        (["-kernel"], "-kernel: requires an argument"),
        (["-machine", "accel=tcg", "-kernel", "k"], "KVM only: use accel=kvm"),
        (["-cpu", "qemu64", "-kernel", "k"], "the host's CPU only: use -cpu host"),
        (["-cpu", "host,+nosuch", "-kernel", "k"], "Property 'host-x86_64-cpu.nosuch' not found"),
        (["-device", "e1000", "-kernel", "k"], "'e1000' is not a valid device model name"),
        (["-device", "vfio-pci,bar=1", "-kernel", "k"], "vfio-pci,host="),
        (["-display", "gtk", "-kernel", "k"], "use -display none"),
        (["-global", "kvm-pit.x=1", "-kernel", "k"], "only kvm-pit.lost_tick_policy"),
        (["-m", "3x", "-kernel", "k"], "Parameter 'size' expects"),
        (["disk.img"], "has no disks"),
        (["-smp", "2"], "no -kernel"),
    ],
)
def test_what_it_cannot_do_is_refused_naming_the_option(argv, words):
    with pytest.raises(ConfigurationError, match=re.escape(words)):
        parse_qemu_argv(argv)


def test_cpu_flags_as_qemu_reads_them():
    assert parse_cpu_option("host,+avx2,-avx2,x2apic,lm=off,sse4_2=on") == (
        "host", {"avx2": False, "x2apic": True, "lm": False, "sse4_2": True},
    )  # fmt: skip
    assert FEATURES["sse4_2"] == FEATURES["sse4.2"]
    assert [bit.describe("svm") for bit in FEATURES["svm"]] == [
        "CPUID.80000001H:ECX.svm [bit 2]"
    ]


def test_a_reset_ends_the_run_only_with_no_reboot():
    assert qemu_status(QemuCommand(no_reboot=True), "triple-fault", 8) == 0
    assert qemu_status(QemuCommand(), "triple-fault", 8) is None  # QEMU starts it again
    assert qemu_status(QemuCommand(), "exit", 7) == 7
    assert qemu_status(QemuCommand(), "internal-error", 12) == 1


def test_the_console_script_is_registered():
    scripts = {entry.name: entry.value for entry in metadata.entry_points(group="console_scripts")}
    assert scripts.get("pyvmm-qemu") == "pyvmm.qemu_cli:main"


def test_version_parses_as_qemus_and_says_pyvmm():
    ours = pyvmm_qemu("--version")
    first, second = ours.stdout.splitlines()[:2]
    assert re.fullmatch(r"QEMU emulator version (\d+)\.(\d+)\.(\d+) \(pyvmm [^)]+\)", first)
    assert "pyvmm" in second and "not QEMU" in second
    assert pyvmm_qemu("-help").stdout.startswith(first)


@needs_qemu
def test_device_help_lists_its_devices_in_qemus_lines():
    ours = pyvmm_qemu("-device", "help").stdout.splitlines()
    theirs = set(qemu("-device", "help").stdout.splitlines())
    listed = [line for line in ours if line.startswith("name ")]
    assert 'name "isa-debug-exit", bus ISA' in listed and len(listed) >= 2
    assert set(listed) <= theirs, set(listed) - theirs
    assert pyvmm_qemu("-device", "?").stdout.splitlines() == ours
    option_help = ["-device", "isa-debug-exit,help"]
    assert pyvmm_qemu(*option_help).stdout == qemu(*option_help).stdout


@needs_qemu
@pytest.mark.parametrize("argv", [["-foo"], ["-kernel"], ["-device", "nosuch", "-kernel"]])
def test_a_bad_option_fails_as_qemus_does(argv):
    if argv[-1] == "-kernel" and len(argv) > 1:
        argv = [*argv, str(guest_path("mb_debug_exit"))]
    ours, theirs = pyvmm_qemu(*argv), qemu(*argv)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.count("\n") == 1 and "Traceback" not in ours.stderr
    # The same words after the program's name.
    assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1]


def side_by_side(*argv: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    ours = pyvmm_qemu(*argv)
    assert "Traceback" not in ours.stderr, ours.stderr
    if QEMU is None:
        return ours, ours
    return ours, qemu(*argv)


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    "cpu",
    [HOST_CPU, f"{HOST_CPU},-x2apic,-avx2,-lm", f"{HOST_CPU},-kvmclock,x2apic=off,+topoext"],
)
def test_cpu_flags_reach_the_guest_as_under_qemu(cpu):
    kernel = str(guest_path("mb_cpu_flags"))
    ours, theirs = side_by_side(*COMMON, "-cpu", cpu, "-kernel", kernel)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout == theirs.stdout and ours.stdout.startswith("leaf 1 ")


@pytest.mark.usefixtures("kvm_required")
def test_a_feature_the_host_lacks_warns_as_qemu_does():
    kernel = str(guest_path("mb_cpu_flags"))
    missing = next(
        (name for name in ("svm", "vmx") if name not in open("/proc/cpuinfo").read().split()),
        None,
    )
    if missing is None:
        pytest.skip("this host has both svm and vmx")
    ours, theirs = side_by_side(*COMMON, "-cpu", f"{HOST_CPU},+{missing}", "-kernel", kernel)
    assert ours.stdout == theirs.stdout
    warning = [line.split(": ", 1)[1] for line in ours.stderr.splitlines() if "warning" in line]
    assert warning == [line.split(": ", 1)[1] for line in theirs.stderr.splitlines()]


@pytest.mark.usefixtures("kvm_required")
@pytest.mark.parametrize(
    ("devices", "append", "status"),
    [
        ([], "port=0xf4 value=3", 0),  # -nodefaults: QEMU has no debug exit unless asked
        (["-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"], "port=0xf7 value=3", 7),
        (["-device", "isa-debug-exit"], "port=0x501 value=1 width=2", 3),
    ],
)
def test_exit_statuses_are_qemus(devices, append, status):
    kernel = str(guest_path("mb_debug_exit"))
    argv = [*COMMON, "-cpu", HOST_CPU, *devices, "-kernel", kernel, "-append", append]
    ours, theirs = side_by_side(*argv)
    assert ours.returncode == theirs.returncode == status, ours.stderr
    assert ours.stdout == theirs.stdout


@pytest.mark.usefixtures("kvm_required")
def test_a_triple_fault_with_no_reboot_exits_0_as_under_qemu():
    kernel = str(guest_path("mb_cpu_flags"))
    argv = [*COMMON, "-cpu", HOST_CPU, "-no-reboot", "-kernel", kernel, "-append", "triple"]
    ours, theirs = side_by_side(*argv)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout == theirs.stdout and ours.stdout.endswith("triple fault\n")


@pytest.mark.usefixtures("kvm_required")
def test_lost_tick_policy_discard_reaches_kvm():
    kernel = str(guest_path("mb_debug_exit"))
    argv = [*COMMON, "-global", "kvm-pit.lost_tick_policy=discard", "-kernel", kernel]
    ours, theirs = side_by_side(*argv, "-device", "isa-debug-exit", "-append", "port=0x501")
    assert ours.returncode == theirs.returncode == 1, ours.stderr
