"""The builder that assembles a VM from the layers below, and runs it.

    with Machine(memory="64M", cpus=2, serial="capture") as machine:
        machine.load("guest.elf")
        result = machine.run(timeout=10)

A Machine owns everything it opens (/dev/kvm, the VM, vCPUs, guest RAM, devices) and
releases all of it in close(), whatever happened. It runs once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyvmm import hostdev
from pyvmm._native import lib
from pyvmm.assign import Undo, VfioAssignments
from pyvmm.boot import BootPlan, BootProtocol, load_guest
from pyvmm.bus import Bus, ForwardFaults, PythonHandler
from pyvmm.cpu_features import apply_cpu_features
from pyvmm.devices.debug_exit import DEBUG_EXIT_PORT, add_debug_exit
from pyvmm.devices.fw_cfg import FwCfg, add_fw_cfg
from pyvmm.devices.options import parse_device_option
from pyvmm.devices.pc_testdev import PcTestdev, add_pc_testdev
from pyvmm.devices.pci_testdev import add_pci_testdev
from pyvmm.devices.power import add_power_off
from pyvmm.devices.serial import Serial16550
from pyvmm.devices.vfio_pci import VfioPciDevice
from pyvmm.errors import ConfigurationError, PyvmmError
from pyvmm.firmware import Firmware
from pyvmm.irq import GsiRouting
from pyvmm.kvm import Kvm, Vcpu
from pyvmm.layout import VMX_IDENTITY_MAP, VMX_TSS
from pyvmm.loader import LoadedImage
from pyvmm.memory import GuestMemory, MemorySlots
from pyvmm.pci.config import PciFunction, level_triggered_irqs
from pyvmm.pci.host import PciBus
from pyvmm.pci.resources import PciResources
from pyvmm.platform import add_legacy_devices, write_firmware_tables
from pyvmm.result import RunResult
from pyvmm.run import MachineRun
from pyvmm.vcpu import KICK_SIGNAL
from pyvmm.x86 import (
    CpuMode,
    setup_vcpu,
    setup_waiting_vcpu,
    write_boot_tables,
)

PORT_SPACE = 1 << 16
MMIO_SPACE = 1 << 52
MAX_VCPUS = 64  # the test runtime's stacks, and more than any test guest needs


class Machine:
    """A VM with guest RAM, vCPUs, a UART, debug exit and power-off: build, load, run, close."""

    def __init__(
        self,
        memory: int | str = "64M",
        cpus: int = 1,
        *,
        serial: str | int = "stdio",
        irqchip: bool = False,
        fail_on_unclaimed: bool = False,
        kvm_path: str = "/dev/kvm",
        firmware: str | Path | bool | None = None,
    ) -> None:
        """Open KVM and build the VM; see docs/guest-abi.md for what the guest gets.

        firmware: boot through pyvmm's firmware (firmware/) from the reset vector instead
        of entering the guest directly: True for the bundled image, or an image's path.
        """
        if not 1 <= cpus <= MAX_VCPUS:
            raise ConfigurationError(f"--cpus must be between 1 and {MAX_VCPUS}, not {cpus}")
        self.cpus = cpus
        self.irqchip = irqchip
        self.fail_on_unclaimed = fail_on_unclaimed
        self.pio = Bus("port I/O", PORT_SPACE)
        self.mmio = Bus("MMIO", MMIO_SPACE)
        self.vcpus: list[Vcpu] = []
        self.image: LoadedImage | None = None
        self.mode: CpuMode | None = None
        self.boot: BootPlan | None = None
        self.serial: Serial16550 | None = None
        self.memory: GuestMemory | None = None
        self._ran = False
        self._closers: list[Any] = []
        #: the handlers a run replaced, put back once close() has released everything
        self.signal_handlers: dict[int, Any] = {}
        self.pci: PciBus | None = None
        self.pc_testdev: PcTestdev | None = None
        self.assigned: list[VfioPciDevice] = []
        self._vfio: VfioAssignments | None = None
        #: CPUID features to set (True) or clear (False) by QEMU's names (pyvmm.cpu_features)
        self.cpu_features: dict[str, bool] = {}
        try:
            self.kvm = Kvm(kvm_path)
            self._closers.append(self.kvm.close)
            self.vm = self.kvm.create_vm()
            self._closers.append(self.vm.close)
            self.memory = GuestMemory(memory)
            self._closers.append(self.memory.close)
            self._setup_vm()
            self.serial = Serial16550(self.pio, serial, self.vm.fd if irqchip else -1)
            self._closers.append(self.serial.close)
            add_debug_exit(self.pio)
            self._default_debug_exit = True
            add_power_off(self.pio)
            self.cmos = add_legacy_devices(self.pio, self.memory, cpus)
            self.fw_cfg: FwCfg | None = None
            self.firmware: Firmware | None = None
            if firmware is not None and firmware is not False:
                path = None if firmware is True else firmware
                self.firmware = Firmware(self.vm, self.memory_slots, self.memory, path)
                self._closers.append(self.firmware.close)
        except BaseException:
            self.close()
            raise

    def _setup_vm(self) -> None:
        self.vm.set_tss_addr(VMX_TSS.start)
        self.vm.set_identity_map_addr(VMX_IDENTITY_MAP.start)
        if self.irqchip:
            self._create_irqchip()
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(
                slot, region.guest_phys_addr, region.size, region.host_address
            )
        self.memory_slots = MemorySlots(len(self.memory.regions))

    def _create_irqchip(self) -> None:
        self.vm.create_irqchip()
        self.vm.create_pit2()
        # What PC firmware does before any OS runs: the IRQs PCI INTx is routed to are
        # level-triggered in the 8259s' ELCR (the same IRQs on the IOAPIC: pci/config.py).
        self.vm.set_pic_elcr(level_triggered_irqs())

    def enable_irqchip(self) -> None:
        """Create the in-kernel irqchip and PIT now, if the machine has none (before run)."""
        if self.irqchip:
            return
        if self.vcpus:
            raise ConfigurationError("the irqchip must exist before the vCPUs: call before run()")
        self._create_irqchip()
        self.irqchip = True
        lib.pyvmm_uart_set_vm_fd(self.serial.uart, self.vm.fd)

    def _enable_pci(self) -> PciBus:
        if self.pci is None:
            self.enable_irqchip()
            self.pci = PciBus(self.pio, self.mmio)
            self._routing = GsiRouting(self.vm)
            self._routing.commit()  # the PC's routes, which the firmware tables describe
            self._resources = PciResources(self.memory.top)
        return self.pci

    def add_pci_function(self, function: PciFunction) -> int:
        """Plug an emulated PCI function (config_read/config_write) into the next free slot."""
        bus = self._enable_pci()
        slot = bus.next_free_slot()
        bus.add(slot, function)
        return slot

    def place_memory_bar(self, size: int, is_64: bool) -> int:
        """Place a memory BAR for an emulated function, as pyvmm places assigned devices'
        (pci/resources.py); returns its address. A 64-bit BAR above RAM joins the identity
        map and the DSDT's window."""
        self._enable_pci()
        return self._resources.memory(size, is_64)

    def add_device(self, option: str) -> None:
        """Add an emulated device spelled as QEMU's -device (`isa-debug-exit,iobase=0x501`).

        The first isa-debug-exit given replaces the default one at 0xF4, so that the ports
        are where the user put them and nowhere else, as under QEMU.
        """
        if self._ran:
            raise ConfigurationError("add devices before run()")
        device = parse_device_option(option)
        if device.name == "isa-debug-exit":
            self.remove_default_debug_exit()
            add_debug_exit(self.pio, device.properties["iobase"], device.properties["iosize"])
        elif device.name == "pc-testdev":
            self.enable_irqchip()  # its IRQ-line ports drive the in-kernel 8259 and IOAPIC
            self.pc_testdev = add_pc_testdev(self.pio, self.mmio, self.memory, self.vm.irq_line)
        elif device.name == "pci-testdev":
            self._closers.append(add_pci_testdev(self, device.properties["membar"]).close)

    def place_io_bar(self, size: int) -> int:
        """Place an I/O BAR for an emulated function, as for assigned devices; its first port."""
        self._enable_pci()
        return self._resources.io(size)

    def remove_default_debug_exit(self) -> None:
        """Take away the isa-debug-exit every machine has at 0xF4 (QEMU has none by default)."""
        if self._default_debug_exit:
            self.pio.remove(DEBUG_EXIT_PORT)
            self._default_debug_exit = False

    def assign(self, device: str, vfio: str = "auto", mmap: bool = True) -> VfioPciDevice:
        """Give the guest a host PCI device or mdev through VFIO, on the next free PCI slot.

        device is a PCI address (0000:00:02.0), a sysfs path or an mdev UUID; vfio is "cdev"
        (iommufd), "group" (container/group) or "auto" (cdev where the kernel has it). With
        mmap=False every BAR access is trapped (served in C) instead of mapped into the guest.
        Turns on the in-kernel irqchip: interrupts arrive through irqfds.
        """
        if self._ran:
            raise ConfigurationError("assign devices before run()")
        try:
            host = hostdev.find_device(device)
            self._enable_pci()
            if self._vfio is None:
                self._vfio = VfioAssignments(self.vm, self.memory)
                self._closers.append(self._vfio.close)
            opened = self._vfio.open(host, vfio)
        except PyvmmError as error:
            # Name the device as the caller wrote it: a group node or a resolved name alone
            # does not say which --device failed.
            if not error.message.startswith(device):
                error.message = f"{device}: {error.message}"
                error.args = (error.message,)
            raise
        slot = self.pci.next_free_slot()
        try:
            assigned = VfioPciDevice(
                opened.device,
                slot,
                vm=self.vm,
                pio=self.pio,
                mmio=self.mmio,
                routing=self._routing,
                slots=self.memory_slots,
                resources=self._resources,
                mmap_bars=mmap,
                label=device,
                guest_ram=[(r.guest_phys_addr, r.size) for r in self.memory.regions],
            )
        except BaseException:
            self._vfio.opened.remove(opened)
            opened.close()
            raise

        def release_device() -> None:
            if opened in self._vfio.opened:
                self._vfio.opened.remove(opened)
                opened.close()

        def release() -> None:
            undo = Undo()
            undo.push(release_device)
            undo.push(assigned.close)
            undo.run()

        self._closers.append(release)
        self.pci.add(slot, assigned)
        self.assigned.append(assigned)
        return assigned

    def load(
        self,
        path: str | Path,
        mode: CpuMode | str | None = None,
        boot: BootProtocol | str | None = None,
        append: str | bytes = "",
        initrd: Sequence[str | Path] = (),
    ) -> LoadedImage:
        """Load a guest with the protocol it speaks, or boot: see boot.load_guest.

        A multiboot kernel boots like a PC: in-kernel irqchip on, only vCPU 0 started.
        With firmware, the guest goes to the firmware's staging RAM, for run() to publish.
        """
        memory = self._boot_memory()
        plan = load_guest(memory, path, mode=mode, boot=boot, append=append, initrd=initrd)
        if self.firmware is not None:
            self.firmware.check(plan)
        self.boot, self.image, self.mode = plan, plan.image, plan.mode
        if plan.boot_cpu_only:
            self._boot_like_a_pc(plan, append)
        if self.firmware is None:
            write_boot_tables(
                self.memory, self.mode, protocol=plan.protocol.value, placed=plan.regions
            )
        elif self.fw_cfg is None:
            self.fw_cfg = add_fw_cfg(self)  # where the firmware finds the guest
        return self.image

    def _boot_memory(self) -> GuestMemory:
        """Where the guest and its boot information are built: RAM, or the firmware's."""
        return self.memory if self.firmware is None else self.firmware.staging

    def add_pio(self, base: int, length: int, handler: PythonHandler, name: str = "") -> None:
        """Serve ports [base, base + length) with a Python handler(offset, data, is_write)."""
        self.pio.add(base, length, handler, name)

    def add_mmio(self, base: int, length: int, handler: PythonHandler, name: str = "") -> None:
        """Serve MMIO [base, base + length) with a Python handler(offset, data, is_write)."""
        self.mmio.add(base, length, handler, name)

    def forward_pio(
        self, base: int, length: int, fd: int, offset: int = 0, *, tolerant: bool = False
    ) -> ForwardFaults | None:
        """Serve ports natively by pread/pwrite on fd at offset + (port - base).

        By default a failing pread/pwrite ends the run (status 22, "forwarded access
        failed"). With tolerant=True it is the guest's problem, as for an assigned device's
        BARs: a failed read gives all ones, a failed write is dropped, and the returned
        ForwardFaults counts them and keeps the first.
        """
        faults = ForwardFaults() if tolerant else None
        self.pio.add_fd(base, length, fd, offset, faults=faults)
        return faults

    def forward_mmio(
        self, base: int, length: int, fd: int, offset: int = 0, *, tolerant: bool = False
    ) -> ForwardFaults | None:
        """Serve MMIO natively by pread/pwrite on fd at offset + (address - base).

        Failures end the run, or with tolerant=True are recorded, as in forward_pio.
        """
        faults = ForwardFaults() if tolerant else None
        self.mmio.add_fd(base, length, fd, offset, faults=faults)
        return faults

    def pio_buffer(self, base: int, length: int, name: str = "") -> np.ndarray:
        """Back ports [base, base + length) with a host byte array, served natively."""
        return self.pio.add_buffer(base, length, name)

    def mmio_buffer(self, base: int, length: int, name: str = "") -> np.ndarray:
        """Back MMIO [base, base + length) with a host byte array, served natively."""
        return self.mmio.add_buffer(base, length, name)

    def _boot_like_a_pc(self, plan: BootPlan, append: str | bytes) -> None:
        """The platform a kernel booted as by QEMU's -kernel finds: irqchip, PCI, fw_cfg."""
        self._enable_pci()
        self.fw_cfg = add_fw_cfg(self)
        self.fw_cfg.set_cmdline(append)
        if plan.linux is not None:
            image = plan.linux
            kernel = self._boot_memory().read(image.load_address, image.kernel_size)
            self.fw_cfg.set_kernel(kernel, addr=image.load_address, entry=image.entry)
            if image.initrd is not None:
                self.fw_cfg.set_initrd(
                    self._boot_memory().read(*image.initrd), addr=image.initrd[0]
                )

    def _create_vcpus(self, cpuid: Any) -> None:
        if self.image is None:
            raise ConfigurationError("no guest loaded: call load() before run()")
        for index in range(self.cpus):
            vcpu = self.vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            if self.boot.boot_cpu_only and index:
                setup_waiting_vcpu(vcpu, index, cpuid)  # the guest starts it with INIT/SIPI
                continue
            if self.firmware is not None:
                self.firmware.start_vcpu(vcpu, index, cpuid)  # at the reset vector
            else:
                registers = self.boot.registers
                setup_vcpu(vcpu, self.mode, self.image.entry, index, self.cpus, cpuid, registers,
                           self.boot.gdt.start)  # fmt: skip
            if self.irqchip and index:
                # With an in-kernel LAPIC, APs wait for INIT/SIPI; ours start at the entry
                # (with firmware, at the reset vector).
                vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)

    def run(self, timeout: float | None = None) -> RunResult:
        """Run every vCPU until the guest ends, a vCPU fails, timeout passes, or a signal."""
        if self._ran:
            raise ConfigurationError("a Machine runs once: build a new one to run again")
        self._ran = True
        lib.pyvmm_install_kick_handler(KICK_SIGNAL)
        if self.boot is not None and self.pci is not None and self.firmware is None:
            # 64-bit BARs placed above RAM must be inside the guest's identity map too.
            write_boot_tables(
                self.memory, self.mode, self._resources.high_top, self.boot.protocol.value,
                self.boot.regions,
            )  # fmt: skip
        cpuid = self.kvm.supported_cpuid()
        apply_cpu_features(cpuid, self.cpu_features)
        if self.pci is not None:  # a PC-style boot, or assigned devices: describe the machine
            write_firmware_tables(self._boot_memory(), self.cpus, cpuid)
        if self.firmware is not None and self.image is not None:
            top = self._resources.high_top if self.pci is not None else 0
            self.firmware.publish(
                self.fw_cfg, self.boot, self.cpus, device_top=top, tables=self.pci is not None
            )
        self._create_vcpus(cpuid)
        if self.boot is not None and self.boot.enter is not None and self.firmware is None:
            self.boot.enter(self.vcpus[0])
        in_main = threading.current_thread() is threading.main_thread()
        return MachineRun(self, timeout, handle_signals=in_main).result()

    def close(self) -> None:
        """Release everything: vCPUs, devices, guest RAM, the VM and /dev/kvm.

        Every step runs even when one raises (the first error is raised at the end); SIGINT
        and SIGTERM stay with the run's handler until the last step, so neither aborts it.
        """
        undo = Undo()
        undo.push(self._restore_signals)
        undo.steps.extend(self._closers)
        self._closers = []
        undo.steps.extend(vcpu.close for vcpu in reversed(self.vcpus))
        self.vcpus = []
        undo.run()

    def _restore_signals(self) -> None:
        previous, self.signal_handlers = self.signal_handlers, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
