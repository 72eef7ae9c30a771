"""Boot benchmark: how soon pyvmm runs a guest's first instruction, how many exits a whole boot
costs, and QEMU on the same machine as the reference.

    python bench/boot.py [--repeat R]

Guests: `hello` (pyvmm's own ELF entry ABI) and `multiboot_info` (a multiboot kernel, which
QEMU boots too). Paths: `direct` (pyvmm loads the kernel and enters it itself) and, where
`pyvmm run --help` offers `--firmware`, `firmware` (through pyvmm's firmware, from the reset
vector); `qemu` is `qemu-system-x86_64 -machine q35 -accel kvm -kernel multiboot_info.elf
-nographic -device isa-debug-exit,iobase=0xf4 -no-reboot` (it cannot boot `hello`, an ELF64).

What is timed, each from a point on the monotonic clock:

- first KVM_RUN, API: in this process, from just before `Machine()` to the boot CPU's first
  KVM_RUN: building the VM, loading the guest, and `run()`'s set-up (firmware tables, vCPUs,
  the vCPU thread), without interpreter start-up or imports. The moment is taken when the
  vCPU thread enters the C run loop (`VcpuRunner.run`), whose first act is the KVM_RUN ioctl.
- first KVM_RUN, process: the same moment, from just before spawning `python -c <wrapper> run
  GUEST`, where the wrapper installs the same hook and calls `pyvmm.cli.main` (what
  `python -m pyvmm run GUEST` runs): interpreter start-up and imports included.
- first line: from spawning the process to the guest's first line on its stdout (`magic
  2badb002` for multiboot_info; for QEMU, after SeaBIOS's and iPXE's own output).
- exit: from spawning to the process's exit, for pyvmm and QEMU alike.
- exits: the whole run's VM exits by reason, from `pyvmm run --stats`. QEMU's are not
  counted (this needs KVM's debugfs statistics, absent here).

Each figure is the median of R runs (the minimum is shown too), interleaved, after one
untimed warm-up of each. The last line of output is one JSON object (see bench/README.md).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import selectors
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from environment import describe_machine, kvm_unusable_reason, load_average

GUESTS = ("hello", "multiboot_info")
#: The guest's first line, as it starts: where "first line" is timed.
FIRST_LINE = {"hello": "Hello from a pyvmm guest!", "multiboot_info": "magic 2badb002"}
QEMU_GUESTS = ("multiboot_info",)
RUN_TIMEOUT_S = 60.0
MARKER = "pyvmm-bench:"

#: Runs pyvmm's command line with one hook: the monotonic time at which the first vCPU thread
#: enters the C run loop is printed on stderr, after the run.
WRAPPER = f"""
import sys, time
from pyvmm import cli, vcpu
first = []
original = vcpu.VcpuRunner.run
def run(self):
    if not first:
        first.append(time.monotonic())
    return original(self)
vcpu.VcpuRunner.run = run
status = cli.main(sys.argv[1:])
sys.stdout.flush()
print("{MARKER} first_kvm_run", first[0] if first else -1, file=sys.stderr)
sys.exit(status)
"""


class BenchmarkError(RuntimeError):
    """A boot did not end the way it should (exit status 0 and the guest's first line)."""


@dataclass
class Sample:
    """One boot: times in seconds (None where not measured) and pyvmm's exit counts."""

    first_run: float | None = None
    first_line: float | None = None
    wall: float | None = None
    exits: int | None = None
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def run_to_line(self) -> float | None:
        """From the first KVM_RUN to the first line, in one process: the guest's own start
        (through the firmware, on that path), without the interpreter's."""
        if self.first_run is None or self.first_line is None:
            return None
        return self.first_line - self.first_run


@dataclass
class Row:
    """All samples of one guest on one path."""

    guest: str
    path: str
    api: list[Sample] = field(default_factory=list)
    process: list[Sample] = field(default_factory=list)
    note: str = ""


# --------------------------------------------------------------------------- the runs


def child_setting() -> tuple[str, dict[str, str]]:
    """(cwd, environment) for pyvmm processes: they import the pyvmm this process imported.

    An installed pyvmm and the checkout a benchmark runs from may differ; started in the
    root of this process's pyvmm, with it first on PYTHONPATH, a child cannot pick the other.
    """
    import pyvmm

    root = str(Path(pyvmm.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return root, env


def firmware_available() -> bool:
    """Whether this pyvmm has `pyvmm run --firmware`."""
    cwd, env = child_setting()
    done = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
        cwd=cwd,
        env=env,
    )
    return "--firmware" in done.stdout


def watch(command: list[str], first_line: str) -> tuple[Sample, str, str, int]:
    """Spawn command; time its first line starting with first_line, and its exit.

    Returns (sample, stdout, stderr, exit status); sample.first_line is None if the line never
    came. Killed after RUN_TIMEOUT_S.
    """
    cwd, env = child_setting()
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
    )
    output = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    sample = Sample()
    wanted = first_line.encode()
    with selectors.DefaultSelector() as selector:
        for fd in output:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = started + RUN_TIMEOUT_S - time.monotonic()
            ready = selector.select(timeout=max(left, 0))
            if not ready:
                process.kill()
                break
            for key, _ in ready:
                chunk = os.read(key.fd, 65536)
                now = time.monotonic()
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                data = output[key.fd]
                data += chunk
                if key.fd == process.stdout.fileno() and sample.first_line is None:
                    at = data.find(wanted)
                    if at >= 0 and b"\n" in data[at:]:
                        sample.first_line = now - started
    status = process.wait()
    sample.wall = time.monotonic() - started
    stdout = output[process.stdout.fileno()].decode("utf-8", "replace")
    stderr = output[process.stderr.fileno()].decode("utf-8", "replace")
    process.stdout.close()
    process.stderr.close()
    sample.first_run = _first_kvm_run(stderr, started)
    return sample, stdout, stderr, status


def _first_kvm_run(stderr: str, started: float) -> float | None:
    match = re.search(rf"^{MARKER} first_kvm_run (\S+)$", stderr, re.MULTILINE)
    if match is None or float(match.group(1)) < 0:
        return None
    return float(match.group(1)) - started


def _exit_counts(stderr: str) -> tuple[int | None, dict[str, int]]:
    """Total exits and exits by reason from --stats' first line."""
    match = re.search(r"^pyvmm: stats: (\d+) exits \(([^)]*)\)", stderr, re.MULTILINE)
    if match is None:
        return None, {}
    reasons = {}
    for item in match.group(2).split(", "):
        name, _, count = item.rpartition(" ")
        if name:
            reasons[name] = int(count)
    return int(match.group(1)), reasons


def run_process(guest: str, path: str) -> Sample:
    """Boot guest with `pyvmm run` (through the timing wrapper) in a new process."""
    from pyvmm import guest_path

    extra = ["--firmware"] if path == "firmware" else []
    command = [sys.executable, "-c", WRAPPER, "run", str(guest_path(guest)), *extra, "--stats"]
    command += ["--timeout", str(RUN_TIMEOUT_S)]
    sample, stdout, stderr, status = watch(command, FIRST_LINE[guest])
    if status != 0 or sample.first_line is None or sample.first_run is None:
        raise BenchmarkError(f"pyvmm run {guest} ({path}): status {status}\n{stdout}{stderr}")
    sample.exits, sample.reasons = _exit_counts(stderr)
    return sample


def run_qemu(qemu: str, guest: str) -> Sample:
    """Boot guest under QEMU with KVM; it powers off through ACPI (port 0x604 on q35)."""
    from pyvmm import guest_path

    command = [
        qemu, "-machine", "q35", "-accel", "kvm", "-kernel", str(guest_path(guest)),
        "-nographic", "-device", "isa-debug-exit,iobase=0xf4", "-no-reboot",
    ]  # fmt: skip
    sample, stdout, stderr, status = watch(command, FIRST_LINE[guest])
    if status != 0 or sample.first_line is None:
        raise BenchmarkError(f"qemu {guest}: status {status}\n{stdout[-2000:]}{stderr}")
    sample.first_run = None  # not observable from outside
    return sample


class FirstRunProbe:
    """Records when a vCPU thread first enters the C run loop in this process."""

    def __init__(self) -> None:
        from pyvmm import vcpu

        self.first: float | None = None
        self._module = vcpu
        self._original = vcpu.VcpuRunner.run
        probe = self
        original = self._original

        def run(runner: vcpu.VcpuRunner) -> vcpu.VcpuStop:
            if probe.first is None:
                probe.first = time.monotonic()
            return original(runner)

        vcpu.VcpuRunner.run = run

    def close(self) -> None:
        """Put the original method back."""
        self._module.VcpuRunner.run = self._original


def firmware_options(machine_class: type) -> tuple[dict[str, object], dict[str, object]]:
    """The keyword arguments that ask Machine() or load() for the firmware path, by signature."""
    if "firmware" in inspect.signature(machine_class).parameters:
        return {"firmware": True}, {}
    if "firmware" in inspect.signature(machine_class.load).parameters:
        return {}, {"firmware": True}
    raise BenchmarkError("Machine takes no firmware option: the API firmware path is not run")


def run_api(guest: str, path: str, probe: FirstRunProbe) -> Sample:
    """Boot guest in this process through the Python API."""
    from pyvmm import guest_path
    from pyvmm.machine import Machine

    build, load = firmware_options(Machine) if path == "firmware" else ({}, {})
    probe.first = None
    started = time.monotonic()
    with Machine(memory="64M", serial="capture", **build) as machine:
        machine.load(guest_path(guest), **load)
        result = machine.run(timeout=RUN_TIMEOUT_S)
    if result.exit_status != 0 or probe.first is None:
        raise BenchmarkError(f"API {guest} ({path}): {result.message}\n{result.serial_text}")
    return Sample(
        first_run=probe.first - started,
        exits=result.exits,
        reasons=dict(result.exit_reasons),
    )


# --------------------------------------------------------------------------- measurement


def measure(repeat: int, paths: list[str], qemu: str | None, verbose: bool) -> list[Row]:
    """Warm up each boot once, then run every one repeat times, interleaved."""
    rows = [Row(guest, path) for guest in GUESTS for path in paths]
    if qemu is not None:
        rows += [Row(guest, "qemu") for guest in QEMU_GUESTS]
    probe = FirstRunProbe()
    runners: list[tuple[list[Sample], Callable[[], Sample]]] = []
    try:
        for row in rows:
            if row.path == "qemu":
                runners.append((row.process, lambda g=row.guest: run_qemu(qemu, g)))
                continue
            runners.append((row.process, lambda g=row.guest, p=row.path: run_process(g, p)))
            runners.append((row.api, lambda g=row.guest, p=row.path: run_api(g, p, probe)))
        usable = []
        for samples, run in runners:
            try:
                run()  # the warm-up, untimed
            except BenchmarkError as error:
                row = next(r for r in rows if samples is r.api or samples is r.process)
                row.note = str(error).splitlines()[0]
                print(f"  skipped: {row.note}", file=sys.stderr)
                continue
            usable.append((samples, run))
        for round_ in range(repeat):
            # Rotate the order each round, so that no boot always comes first.
            shift = round_ % len(usable) if usable else 0
            for samples, run in usable[shift:] + usable[:shift]:
                samples.append(run())
            if verbose:
                print(f"  round {round_ + 1}/{repeat} done", file=sys.stderr, flush=True)
    finally:
        probe.close()
    return rows


# --------------------------------------------------------------------------- the report


def _stat(samples: list[Sample], name: str, pick: Callable) -> float | None:
    values = [getattr(s, name) for s in samples if getattr(s, name) is not None]
    return pick(values) if values else None


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _fmt(value: float | None, width: int = 9) -> str:
    return f"{value:{width}.1f}" if value is not None else f"{'n/a':>{width}}"


def _pair(summary: dict, key: str) -> str:
    """A median and, in brackets, the minimum."""
    return f"{_fmt(summary[key], 7)} ({_fmt(summary['min_' + key], 6)})"


def summarize(row: Row) -> dict[str, object]:
    """One row's figures in ms (median, and min) and its exit counts."""
    median, best = statistics.median, min
    last = row.process[-1] if row.process else None
    api_last = row.api[-1] if row.api else None
    counted = last if last is not None and last.exits is not None else api_last
    return {
        "guest": row.guest,
        "path": row.path,
        "api_first_kvm_run_ms": _ms(_stat(row.api, "first_run", median)),
        "process_first_kvm_run_ms": _ms(_stat(row.process, "first_run", median)),
        "first_line_ms": _ms(_stat(row.process, "first_line", median)),
        "exit_ms": _ms(_stat(row.process, "wall", median)),
        "run_to_line_ms": _ms(_stat(row.process, "run_to_line", median)),
        "min_api_first_kvm_run_ms": _ms(_stat(row.api, "first_run", best)),
        "min_process_first_kvm_run_ms": _ms(_stat(row.process, "first_run", best)),
        "min_first_line_ms": _ms(_stat(row.process, "first_line", best)),
        "min_exit_ms": _ms(_stat(row.process, "wall", best)),
        "min_run_to_line_ms": _ms(_stat(row.process, "run_to_line", best)),
        "exits": counted.exits if counted is not None else None,
        "exit_reasons": counted.reasons if counted is not None else {},
        "note": row.note,
    }


def report(rows: list[Row], repeat: int, machine: str, load: str, seconds: float) -> dict:
    """Print the table and return the JSON summary."""
    summaries = [summarize(row) for row in rows]
    print(f"Boot: ms from the start of each measure, median of {repeat} (min in brackets)")
    print(f"machine: {machine}")
    print(f"load average (1, 5, 15 min) before, after: {load}")
    header = (
        f"{'guest':<15} {'path':<9} {'1st KVM_RUN api':>16} {'1st KVM_RUN proc':>17} "
        f"{'first line':>16} {'exit':>16} {'KVM_RUN->line':>16} {'exits':>6}  by reason"
    )
    print(header)
    for s in summaries:
        if s["note"] and s["exit_ms"] is None and s["api_first_kvm_run_ms"] is None:
            print(f"{s['guest']:<15} {s['path']:<9} not run: {s['note']}")
            continue
        reasons = ", ".join(f"{name} {count}" for name, count in s["exit_reasons"].items())
        exits = str(s["exits"]) if s["exits"] is not None else "n/a"
        print(
            f"{s['guest']:<15} {s['path']:<9} {_pair(s, 'api_first_kvm_run_ms'):>16} "
            f"{_pair(s, 'process_first_kvm_run_ms'):>17} {_pair(s, 'first_line_ms'):>16} "
            f"{_pair(s, 'exit_ms'):>16} {_pair(s, 'run_to_line_ms'):>16} {exits:>6}  "
            f"{reasons or '-'}"
        )
    print(
        "1st KVM_RUN api: Machine() to the boot CPU's first KVM_RUN, in-process; "
        "1st KVM_RUN proc: spawn of `python -c <wrapper> run GUEST` to the same moment"
    )
    print(
        "first line: spawn to the guest's first line on stdout; exit: spawn to process exit; "
        "KVM_RUN->line: first KVM_RUN to first line, in the process"
    )
    print("exits: the run's VM exits (--stats); QEMU's are not counted (no KVM debugfs here)")
    for s in summaries:
        if s["note"] and (s["exit_ms"] is not None or s["api_first_kvm_run_ms"] is not None):
            print(f"note: {s['guest']} {s['path']}: {s['note']}")
    print(f"total benchmark time {seconds:.1f} s")
    by_key = {f"{s['guest']}_{s['path']}": s for s in summaries}
    direct, qemu = by_key.get("multiboot_info_direct"), by_key.get("multiboot_info_qemu")
    headline: dict[str, object] = {}
    if direct and qemu and direct["exit_ms"] and qemu["exit_ms"]:
        headline = {
            "multiboot_info_direct_exit_ms": direct["exit_ms"],
            "multiboot_info_qemu_exit_ms": qemu["exit_ms"],
            "multiboot_info_qemu_over_direct": round(qemu["exit_ms"] / direct["exit_ms"], 2),
        }
    return {
        **headline,
        "rows": summaries,
        "repeat": repeat,
        "stat": "median",
        "load_average": load,
        "timing": "monotonic clock; first KVM_RUN = first entry into the C run loop",
        "machine": machine,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeat", "-r", type=int, default=5, help="timed boots of each kind (default 5)"
    )
    parser.add_argument("--no-qemu", action="store_true", help="leave the QEMU reference out")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def benchmark(args: argparse.Namespace, machine: str) -> dict:
    """Run what can run here, print the table; returns the JSON summary (or why not)."""
    reason = kvm_unusable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return {"skipped": True, "reason": reason, "machine": machine}
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    if qemu is None and not args.no_qemu:
        print("qemu-system-x86_64 not found: the reference rows are left out")
    paths = ["direct", *(["firmware"] if firmware_available() else [])]
    if "firmware" not in paths:
        print("this pyvmm has no `run --firmware`: the firmware path is left out")
    load_before = load_average()
    started = time.monotonic()
    try:
        rows = measure(args.repeat, paths, qemu, not args.quiet)
    except Exception as error:  # a failed boot: still end with a JSON line
        what = f"{type(error).__name__}: {error}"
        print(f"benchmark failed: {what}")
        return {"error": what, "machine": machine}
    seconds = time.monotonic() - started
    load = f"{load_before} -> {load_average()}"
    return report(rows, args.repeat, machine, load, seconds)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table, then the JSON line last."""
    summary = benchmark(parse_args(argv), describe_machine())
    print(json.dumps(summary))
    return 1 if "error" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
