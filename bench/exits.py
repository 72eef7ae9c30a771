"""Exit-cost benchmark: what one VM exit costs in pyvmm, against a minimal C VMM.

    python bench/exits.py [--iterations N] [--repeat R]

The guest (guests/exits.S) reads N from port 0x518 and a mode from port 0x51C, then makes N
port writes (outl to 0x510, mode 1) or N MMIO writes (to 0xD0002000, mode 2), then powers off:
3 + N exits in all. Each exit kind is served three ways:

- native: pyvmm, the ranges backed by host buffers (pio_buffer / mmio_buffer), so the C run
  loop serves every exit with a memcpy, without entering Python;
- native_fd: pyvmm, the ranges forwarded to memfds (forward_pio / forward_mmio), served in
  the C loop by pread/pwrite: the path trapped VFIO BAR access takes;
- python: pyvmm, the ranges served by minimal Python handlers (add_pio / add_mmio);
- c: bench/reference_vmm.c, a bare KVM_RUN loop compiled here with gcc on every run;
- c_fd: the same C VMM serving the ranges by pread/pwrite on memfds, as pyvmm's native_fd
  path does, so native_fd - c_fd is pyvmm's own overhead there and c_fd - c the syscalls.

Cost per exit = (best time at N - best time at N = 0) / N over R interleaved repeats (or the
medians, --stat median), so VM creation, the first KVM_RUN and teardown cancel out. Best is
the default because the noise on a shared machine only ever adds time. pyvmm is timed by
RunResult.elapsed (vCPU threads started to joined, around the KVM_RUN loop); the C VMM
times CLOCK_MONOTONIC from just before its first KVM_RUN to just after its last exit. The
wall clock around Machine.run() is shown too.

The last line of output is one JSON object (see bench/README.md); everything before it is
for people.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from environment import (
    build_reference,
    describe_machine,
    guest_images,
    kvm_unusable_reason,
    load_average,
)

PIO_BASE, PIO_LENGTH = 0x510, 16  # 0x510: the outl target; 0x518: N; 0x51C: mode
MMIO_BASE, MMIO_LENGTH = 0xD0002000, 0x1000
N_OFFSET, MODE_OFFSET = 8, 12  # of ports 0x518 and 0x51C in the 0x510 range
MODES = {"pio": 1, "mmio": 2}
METHODS = ("c", "c_fd", "native", "native_fd", "python")
GOAL_NATIVE_US = 0.3  # the goal: native within 0.3 us of C per exit
GOAL_PYTHON_US = 1.5  # and Python handlers within 1.5 us
RUN_TIMEOUT_S = 120.0


class BenchmarkError(RuntimeError):
    """A run did not end the way the guest promises (power-off after 3 + N exits)."""


@dataclass
class Sample:
    """One run: the timed span, the wall clock around it, and the exits it counted."""

    elapsed: float  # seconds, the comparable span (RunResult.elapsed / the C VMM's own timer)
    wall: float  # seconds, wall clock around Machine.run() (the C VMM: same as elapsed)
    exits: int


def expected_exits(n: int, mode: int) -> int:
    """Exits the guest makes: N and mode reads, N per mode bit, and the power-off."""
    return 3 + n * bin(mode & 3).count("1")


# --------------------------------------------------------------------------- the three ways


@contextlib.contextmanager
def memfd(name: str, size: int, contents: bytes = b"") -> Iterator[int]:
    """A memfd of size bytes starting with contents; closed on exit."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        if contents:
            os.pwrite(fd, contents, 0)
        yield fd
    finally:
        os.close(fd)


def pio_handler(n: int, mode: int) -> Callable[[int, memoryview, bool], None]:
    """A minimal port handler: answers the N and mode reads, ignores every write."""
    answers = {N_OFFSET: struct.pack("<I", n), MODE_OFFSET: struct.pack("<I", mode)}
    zeros = bytes(8)

    def handler(offset: int, data: memoryview, is_write: bool) -> None:
        if is_write:
            return
        data[:] = answers.get(offset, zeros)[: len(data)]

    return handler


def mmio_handler(offset: int, data: memoryview, is_write: bool) -> None:
    """A minimal MMIO handler: ignores writes, reads as zero."""
    if not is_write:
        data[:] = bytes(len(data))


def run_pyvmm(elf: Path, n: int, mode: int, how: str) -> Sample:
    """Run the guest once in a fresh pyvmm Machine: how is native, native_fd or python."""
    from pyvmm.machine import Machine

    registers = bytes(N_OFFSET) + struct.pack("<II", n, mode)
    with (
        memfd("bench-pio", PIO_LENGTH, registers) as pio_fd,
        memfd("bench-mmio", MMIO_LENGTH) as mmio_fd,
        Machine(memory="8M", serial="capture") as machine,
    ):
        machine.load(elf)
        if how == "native":
            machine.pio_buffer(PIO_BASE, PIO_LENGTH)[:] = memoryview(registers)
            machine.mmio_buffer(MMIO_BASE, MMIO_LENGTH)
        elif how == "native_fd":
            machine.forward_pio(PIO_BASE, PIO_LENGTH, pio_fd)
            machine.forward_mmio(MMIO_BASE, MMIO_LENGTH, mmio_fd)
        else:
            machine.add_pio(PIO_BASE, PIO_LENGTH, pio_handler(n, mode), "bench pio")
            machine.add_mmio(MMIO_BASE, MMIO_LENGTH, mmio_handler, "bench mmio")
        started = time.perf_counter()
        result = machine.run(timeout=RUN_TIMEOUT_S)
        wall = time.perf_counter() - started
    want = expected_exits(n, mode)
    if result.outcome != "exit" or result.exit_status != 0 or result.exits != want:
        raise BenchmarkError(
            f"pyvmm ({how}, N={n}, mode={mode}): "
            f"{result.message}; {result.exits} exits, expected a power-off after {want}"
        )
    # Every exit but the power-off goes to Python, or none does.
    want_python = want - 1 if how == "python" else 0
    if result.python_exits != want_python:
        raise BenchmarkError(
            f"pyvmm N={n} mode={mode}: {result.python_exits} Python exits, expected {want_python}"
        )
    return Sample(result.elapsed, wall, result.exits)


def run_reference(executable: Path, image: Path, n: int, mode: int, fd: bool = False) -> Sample:
    """Run the guest once under the C reference VMM; it reports its own timing."""
    done = subprocess.run(
        [str(executable), str(image), str(n), str(mode), *(["fd"] if fd else [])],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise BenchmarkError(f"reference VMM N={n} mode={mode}: {done.stderr.strip()}")
    fields = dict(item.split("=", 1) for item in done.stdout.split())
    exits, elapsed = int(fields["exits"]), int(fields["ns"]) / 1e9
    if exits != expected_exits(n, mode):
        raise BenchmarkError(f"reference VMM N={n} mode={mode}: {exits} exits")
    return Sample(elapsed, elapsed, exits)


# --------------------------------------------------------------------------- measurement


@dataclass
class Cell:
    """All samples of one method on one exit kind, at N and at N = 0."""

    big: list[Sample]
    small: list[Sample]

    def per_exit_us(self, n: int, stat: str = "best", wall: bool = False) -> float:
        """(stat at N - stat at 0) / N in microseconds; stat is 'best' (minimum) or 'median'."""

        def pick(s: Sample) -> float:
            return s.wall if wall else s.elapsed

        middle = min if stat == "best" else statistics.median
        big = middle(pick(s) for s in self.big)
        small = middle(pick(s) for s in self.small)
        return (big - small) / n * 1e6

    def mad_us(self, n: int) -> float:
        """Median absolute deviation of the N-run times, per exit: the noise of one run."""
        times = [s.elapsed for s in self.big]
        centre = statistics.median(times)
        return statistics.median(abs(t - centre) for t in times) / n * 1e6


def measure(
    n: int, repeat: int, elf: Path, image: Path, reference: Path | None, verbose: bool
) -> dict[tuple[str, str], Cell]:
    """Run every method on every exit kind repeat times, interleaved; returns the samples."""
    runners: dict[str, Callable[[int, int], Sample]] = {
        "native": lambda n_, mode: run_pyvmm(elf, n_, mode, "native"),
        "native_fd": lambda n_, mode: run_pyvmm(elf, n_, mode, "native_fd"),
        "python": lambda n_, mode: run_pyvmm(elf, n_, mode, "python"),
    }
    if reference is not None:
        runners["c"] = lambda n_, mode: run_reference(reference, image, n_, mode)
        runners["c_fd"] = lambda n_, mode: run_reference(reference, image, n_, mode, fd=True)
    cells = {(m, k): Cell([], []) for m in runners for k in MODES}
    # One untimed warm-up of each, so first-run costs (page faults, imports) stay out.
    for run in runners.values():
        for mode in MODES.values():
            run(min(n, 1000), mode)
    methods = [m for m in METHODS if m in runners]
    for round_ in range(repeat):
        # Rotate the order each round so no method always runs first (or last).
        order = methods[round_ % len(methods) :] + methods[: round_ % len(methods)]
        for kind, mode in MODES.items():
            for method in order:
                cell = cells[method, kind]
                cell.small.append(runners[method](0, mode))
                cell.big.append(runners[method](n, mode))
        if verbose:
            print(f"  round {round_ + 1}/{repeat} done", file=sys.stderr, flush=True)
    return cells


def per_exit_table(
    cells: dict[tuple[str, str], Cell], n: int, stat: str
) -> dict[str, float | None]:
    """{method}_{kind}_us and {method}_us (mean of the kinds) for every method."""
    us: dict[str, float | None] = {}
    for method in METHODS:
        for kind in MODES:
            cell = cells.get((method, kind))
            us[f"{method}_{kind}_us"] = cell.per_exit_us(n, stat) if cell else None
        pio, mmio = us[f"{method}_pio_us"], us[f"{method}_mmio_us"]
        us[f"{method}_us"] = None if pio is None or mmio is None else (pio + mmio) / 2
    return us


def report(
    cells: dict[tuple[str, str], Cell],
    n: int,
    repeat: int,
    stat: str,
    machine: str,
    load: str,
    seconds: float,
) -> dict[str, object]:
    """Print the table and return the JSON summary."""
    other_stat = "median" if stat == "best" else "best"
    short = {"best": "min", "median": "med"}[other_stat]
    us = per_exit_table(cells, n, stat)
    other = per_exit_table(cells, n, other_stat)

    def fmt(value: float | None) -> str:
        return f"{value:9.3f}" if value is not None else f"{'n/a':>9}"

    print(f"Exit cost, us per exit: ({stat} time at N={n} - {stat} at N=0) / N, {repeat} repeats")
    print(f"machine: {machine}")
    print(f"load average (1, 5, 15 min) before, after: {load}")
    print(
        f"{'method':<8} {'pio':>9} {'mmio':>9} {'mean':>9} {'- c':>9} | "
        f"{short + ' pio':>9} {short + ' mmio':>9} | "
        f"{'wall mean':>9} {'MAD':>7}"
    )
    c_mean = us["c_us"]
    for method in METHODS:
        if (method, "pio") not in cells:
            print(f"{method:<8} {'(not run)':>9}")
            continue
        mean = us[f"{method}_us"]
        minus = None if c_mean is None or mean is None else mean - c_mean
        others = [other[f"{method}_{kind}_us"] for kind in MODES]
        wall = statistics.fmean(
            cells[method, kind].per_exit_us(n, stat, wall=True) for kind in MODES
        )
        noise = max(cells[method, kind].mad_us(n) for kind in MODES)
        minus_text = fmt(minus) if method != "c" else " " * 9
        print(
            f"{method:<8} {fmt(us[f'{method}_pio_us'])} {fmt(us[f'{method}_mmio_us'])} "
            f"{fmt(mean)} {minus_text} | {fmt(others[0])} {fmt(others[1])} | "
            f"{fmt(wall)} {noise:7.3f}"
        )
    print(
        "pio, mmio: timed span, RunResult.elapsed for pyvmm, the C VMM's own timer (first "
        "KVM_RUN to last exit); mean: of pio and mmio; - c: mean minus c's mean"
    )
    print(
        f"{short} pio, {short} mmio: the {other_stat} instead; "
        "wall mean: perf_counter around Machine.run(); "
        "MAD: median absolute deviation of one N-run, per exit"
    )
    print(
        "native: buffer-backed ranges (memcpy in C); native_fd: fd-forwarded ranges "
        "(pread/pwrite); c_fd: the C VMM doing pread/pwrite on memfds like native_fd"
    )

    def minus_c(method: str) -> float | None:
        mean = us[f"{method}_us"]
        return None if mean is None or c_mean is None else mean - c_mean

    native_minus_c, python_minus_c = minus_c("native"), minus_c("python")
    native_fd_minus_c_fd = (
        None
        if us["native_fd_us"] is None or us["c_fd_us"] is None
        else us["native_fd_us"] - us["c_fd_us"]
    )
    if native_minus_c is not None and python_minus_c is not None:
        native_met = "met" if native_minus_c <= GOAL_NATIVE_US else "not met"
        python_met = "met" if python_minus_c <= GOAL_PYTHON_US else "not met"
        print(
            f"goal (issue): native within {GOAL_NATIVE_US} us of C: "
            f"{native_minus_c:+.3f} us, {native_met}; "
            f"Python within {GOAL_PYTHON_US} us: {python_minus_c:+.3f} us, {python_met}"
        )
    print(f"total benchmark time {seconds:.1f} s")

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    summary: dict[str, object] = {f"{m}_us": rounded(us[f"{m}_us"]) for m in METHODS}
    for method in METHODS:
        for kind in MODES:
            summary[f"{method}_{kind}_us"] = rounded(us[f"{method}_{kind}_us"])
    summary.update(
        native_minus_c_us=rounded(native_minus_c),
        python_minus_c_us=rounded(python_minus_c),
        native_fd_minus_c_fd_us=rounded(native_fd_minus_c_fd),
        goal_native_minus_c_us=GOAL_NATIVE_US,
        goal_python_minus_c_us=GOAL_PYTHON_US,
        iterations=n,
        repeat=repeat,
        stat=stat,
        other_stat={"stat": other_stat} | {f"{m}_us": rounded(other[f"{m}_us"]) for m in METHODS},
        load_average=load,
        timing="RunResult.elapsed (pyvmm) vs first KVM_RUN to last exit (C)",
        machine=machine,
    )
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--iterations",
        "-n",
        type=int,
        default=30000,
        help="exits per measured run, per exit kind (default 30000)",
    )
    parser.add_argument(
        "--repeat",
        "-r",
        type=int,
        default=9,
        help="runs of each kind at N and at 0; the median is used (default 9)",
    )
    parser.add_argument(
        "--stat",
        choices=("best", "median"),
        default="best",
        help="how R repeats become one time (default best: the minimum)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.repeat < 1:
        parser.error("--iterations and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table, then the JSON line last."""
    args = parse_args(argv)
    machine = describe_machine()
    reason = kvm_unusable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        print(json.dumps({"skipped": True, "reason": reason, "machine": machine}))
        return 0
    elf, image = guest_images()
    load_before = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as directory:
        try:
            reference = build_reference(Path(directory))
        except (OSError, RuntimeError) as error:
            print(f"C reference VMM not built, its column is skipped: {error}")
            reference = None
        try:
            cells = measure(args.iterations, args.repeat, elf, image, reference, not args.quiet)
        except Exception as error:  # a failed run: still end with a JSON line
            what = f"{type(error).__name__}: {error}"
            print(f"benchmark failed: {what}")
            print(json.dumps({"error": what, "machine": machine}))
            return 1
    seconds = time.perf_counter() - started
    load = f"{load_before} -> {load_average()}"
    summary = report(cells, args.iterations, args.repeat, args.stat, machine, load, seconds)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
