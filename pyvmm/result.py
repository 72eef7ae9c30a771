"""What a run produced: how it ended, the exit status, a one-line reason, a register dump.

Turning a vCPU's stop into words lives here, apart from the machinery that runs vCPUs, so
the mapping from KVM exits to messages and exit statuses reads as one table.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from pyvmm._native import lib
from pyvmm.errors import ExitStatus, PyvmmError
from pyvmm.kvm import Vcpu
from pyvmm.vcpu import VcpuRunner, VcpuStop


@dataclass
class Unclaimed:
    """Accesses that no device claimed (reads returned all ones)."""

    count: int = 0
    last_address: int = 0
    last_size: int = 0
    last_is_write: bool = False

    def describe(self, space: str) -> str:
        """One line for a report, e.g. '2 unclaimed MMIO accesses (last: read of 4 bytes ...)'."""
        kind = "write" if self.last_is_write else "read"
        plural = "" if self.count == 1 else "es"
        return (
            f"{self.count} unclaimed {space} access{plural} "
            f"(last: {kind} of {self.last_size} bytes at {self.last_address:#x})"
        )


@dataclass
class RunResult:
    """The outcome of Machine.run()."""

    outcome: str  #: 'exit', 'halted', 'timeout', 'signal', 'triple-fault', ...
    exit_status: int  #: the process exit status `pyvmm run` would use
    message: str  #: one line saying how the run ended
    vcpu: int | None = None  #: the vCPU that ended the run, if one did
    registers: str = ""  #: register dump of that vCPU, for failures
    serial: bytes = b""  #: captured UART output (serial='capture')
    #: UART output bytes dropped because the reader of a pipe or terminal stopped reading.
    serial_dropped: int = 0
    unclaimed_pio: Unclaimed = field(default_factory=Unclaimed)
    unclaimed_mmio: Unclaimed = field(default_factory=Unclaimed)
    exits: int = 0  #: exits from KVM_RUN, all vCPUs
    python_exits: int = 0  #: of those, exits served by Python handlers
    elapsed: float = 0.0  #: seconds from starting the vCPU threads to joining them
    #: Exits by KVM_EXIT_* name, all vCPUs.
    exit_reasons: dict[str, int] = field(default_factory=dict)
    #: Accesses served per claimed range: (space, name, base, count, served in C).
    range_hits: list[tuple[str, str, int, int, bool]] = field(default_factory=list)

    def stats_lines(self) -> list[str]:
        """The --stats report: exits by reason, accesses by range, and how many hit Python."""
        reasons = ", ".join(f"{name} {count}" for name, count in self.exit_reasons.items())
        lines = [
            f"{self.exits} exits ({reasons or 'none'}); {self.python_exits} reached Python, "
            f"{self.exits - self.python_exits} served in C or ended the run"
        ]
        for space, name, base, count, native in self.range_hits:
            where = "C" if native else "Python"
            lines.append(f"{space} {base:#x} {name}: {count} accesses, served in {where}")
        return lines

    @property
    def serial_text(self) -> str:
        """Captured UART output decoded as UTF-8 (errors replaced)."""
        return self.serial.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """Whether the guest ended on its own with status 0."""
        return self.exit_status == 0


def _internal_error(loop) -> str:
    suberrors = {
        lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
        lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
        lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    }
    suberror = loop.run.internal.suberror
    return suberrors.get(suberror, f"suberror {suberror}")


def describe_stop(runner: VcpuRunner, stop: VcpuStop) -> tuple[str, int, str]:
    """Return (outcome, exit status, one-line message) for a vCPU's stop."""
    loop = runner.loop
    index = runner.vcpu.index
    if stop is VcpuStop.GUEST_EXIT:
        status = loop.exit_status
        how = "powered off" if status == 0 else f"exited with status {status}"
        return "exit", status, f"guest {how} (vCPU {index})"
    if stop is VcpuStop.HALTED:
        return "halted", 0, "every vCPU halted with interrupts off"
    if stop is VcpuStop.HALTED_IF:
        return (
            "halted-forever",
            ExitStatus.HALTED_FOREVER,
            (
                f"vCPU {index} halted with interrupts on, but nothing can wake it "
                "(no in-kernel irqchip): end the guest with cli; hlt or a debug exit"
            ),
        )
    if stop is VcpuStop.SHUTDOWN:
        return "triple-fault", ExitStatus.TRIPLE_FAULT, f"vCPU {index} triple-faulted"
    if stop is VcpuStop.FAIL_ENTRY:
        reason = loop.run.fail_entry.hardware_entry_failure_reason
        return (
            "internal-error",
            ExitStatus.INTERNAL_ERROR,
            f"KVM could not enter vCPU {index}: hardware entry failure reason {reason:#x}",
        )
    if stop is VcpuStop.INTERNAL_ERROR:
        return (
            "internal-error",
            ExitStatus.INTERNAL_ERROR,
            f"KVM internal error on vCPU {index}: {_internal_error(loop)}",
        )
    if stop is VcpuStop.REBOOT:
        return "reboot", ExitStatus.REBOOT, f"vCPU {index} rebooted the machine (port 0xCF9)"
    if stop is VcpuStop.SYSTEM_EVENT:
        names = {
            lib.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
            lib.KVM_SYSTEM_EVENT_RESET: "reset",
            lib.KVM_SYSTEM_EVENT_CRASH: "crash",
        }
        event = names.get(loop.run.system_event.type, f"type {loop.run.system_event.type}")
        return "system-event", ExitStatus.SYSTEM_EVENT, f"vCPU {index} raised a {event} event"
    if stop is VcpuStop.UNCLAIMED:
        pio, mmio = loop.unclaimed_pio, loop.unclaimed_mmio
        # The access that stopped the loop is the most recent one of either kind.
        space, record = (
            ("MMIO", mmio) if loop.run.exit_reason == lib.KVM_EXIT_MMIO else ("port", pio)
        )
        kind = "write" if record.last_is_write else "read"
        return (
            "unclaimed",
            ExitStatus.UNCLAIMED_ACCESS,
            (
                f"vCPU {index}: unclaimed {space} {kind} of {record.last_size} bytes at "
                f"{record.last_address:#x} (--fail-on-unclaimed)"
            ),
        )
    if stop is VcpuStop.UNHANDLED_EXIT:
        return (
            "internal-error",
            ExitStatus.INTERNAL_ERROR,
            f"vCPU {index}: KVM exit reason {loop.run.exit_reason} is not handled by pyvmm",
        )
    if stop is VcpuStop.ERROR:
        name = errno.errorcode.get(loop.error, str(loop.error))
        if loop.error_in_device:
            return (
                "device-error",
                ExitStatus.DEVICE_ERROR,
                f"vCPU {index}: forwarded access failed: {name}: {os.strerror(loop.error)}",
            )
        return (
            "internal-error",
            ExitStatus.INTERNAL_ERROR,
            f"KVM_RUN failed on vCPU {index}: {name}: {os.strerror(loop.error)}",
        )
    return "interrupted", ExitStatus.SIGNALLED, f"vCPU {index} was stopped"


def register_dump(vcpu: Vcpu) -> str:
    """A few lines of registers, as a human debugging a guest wants to see them."""
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except PyvmmError as error:  # a dead vCPU must not hide the original failure
        return f"  (registers unavailable: {error.message})"

    def row(*names: str, source=regs) -> str:
        return "  " + " ".join(f"{name}={getattr(source, name):#018x}" for name in names)

    return "\n".join(
        [
            f"  vCPU {vcpu.index}:",
            row("rip", "rsp", "rbp", "rflags"),
            row("rax", "rbx", "rcx", "rdx"),
            row("rsi", "rdi", "r8", "r9"),
            row("r10", "r11", "r12", "r13"),
            row("r14", "r15"),
            row("cr0", "cr2", "cr3", "cr4", source=sregs),
            row("efer", source=sregs)
            + f" cs={sregs.cs.selector:#06x} base={sregs.cs.base:#x}"
            + f" l={sregs.cs.l} db={sregs.cs.db}"
            + f" ss={sregs.ss.selector:#06x} gdt={sregs.gdt.base:#x}/{sregs.gdt.limit:#x}"
            + f" idt={sregs.idt.base:#x}/{sregs.idt.limit:#x}",
        ]
    )


#: KVM_EXIT_* numbers to names, for --stats.
EXIT_REASON_NAMES = {
    getattr(lib, name): name[len("KVM_EXIT_") :]
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}
