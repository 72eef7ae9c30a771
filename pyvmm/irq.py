"""Interrupt routing on the in-kernel irqchip: GSI routes and eventfd-driven vectors.

KVM_SET_GSI_ROUTING replaces the whole table, so ``GsiRouting`` keeps it: the PC's default
routes (GSIs 0-15 to the 8259s and the IOAPIC, 16-23 to the IOAPIC, as KVM sets them up at
KVM_CREATE_IRQCHIP, except that the PIT's GSI 0 goes to IOAPIC pin 2, as on a PC and as
QEMU routes it) plus one MSI route per device vector, each on a GSI of its own from 24 up.
An ``MsiVector`` is one device interrupt message: an eventfd that VFIO signals and a KVM irqfd
that turns each signal into the MSI its route describes, with no exit to userspace. An
``IntxLine`` is a VFIO device's level-triggered INTx on the GSI of a legacy IRQ (10 or 11,
pci/config.py), which reaches both the 8259 input and the IOAPIC pin of that number. Devices
share a GSI as they share a line: KVM keeps one resampler per GSI and, at the guest's EOI,
lowers the line and signals every resample eventfd on it, so each device is unmasked and
raises the line again if it still has something pending.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading

from pyvmm._native import lib
from pyvmm.errors import PyvmmError
from pyvmm.kvm import Vm
from pyvmm.vfio import VfioDevice, VfioIoctlError

INTX = lib.VFIO_PCI_INTX_IRQ_INDEX
EVENTFD_TRIGGER = lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER
NONE_TRIGGER = lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER

IOAPIC_PINS = 24
TIMER_IOAPIC_PIN = 2
PIC_PINS = 16
FIRST_MSI_GSI = IOAPIC_PINS


class GsiRouting:
    """The VM's GSI routing table: the irqchip defaults and the MSI routes of devices."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.msi: dict[int, tuple[int, int]] = {}
        self._free: list[int] = []
        self._next = FIRST_MSI_GSI

    def _entries(self) -> list[dict]:
        entries = []
        for gsi in range(IOAPIC_PINS):
            if gsi == TIMER_IOAPIC_PIN:
                continue  # the 8259 cascade: nothing raises GSI 2
            # The PIT (GSI 0) reaches IOAPIC pin 2, as on a PC and as the MADT's interrupt
            # source override and the MP table say; KVM's own default wires it to pin 0.
            pin = TIMER_IOAPIC_PIN if gsi == 0 else gsi
            entries.append(
                {
                    "gsi": gsi,
                    "type": lib.KVM_IRQ_ROUTING_IRQCHIP,
                    "u": {"irqchip": {"irqchip": lib.KVM_IRQCHIP_IOAPIC, "pin": pin}},
                }
            )
            if gsi < PIC_PINS:
                chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
                entries.append(
                    {
                        "gsi": gsi,
                        "type": lib.KVM_IRQ_ROUTING_IRQCHIP,
                        "u": {"irqchip": {"irqchip": chip, "pin": gsi % 8}},
                    }
                )
        for gsi, (address, data) in sorted(self.msi.items()):
            entries.append(
                {
                    "gsi": gsi,
                    "type": lib.KVM_IRQ_ROUTING_MSI,
                    "u": {
                        "msi": {
                            "address_lo": address & 0xFFFFFFFF,
                            "address_hi": address >> 32,
                            "data": data,
                        }
                    },
                }
            )
        return entries

    def add_msi(self, address: int, data: int) -> int:
        """Route a new GSI to the MSI (address, data); returns the GSI.

        If KVM refuses the table, the GSI goes back to the free list and the error is raised.
        """
        gsi = self._free.pop() if self._free else self._next
        if gsi == self._next:
            self._next += 1
        self.msi[gsi] = (address, data)
        try:
            self.commit()
        except PyvmmError:
            del self.msi[gsi]
            self._free.append(gsi)
            raise
        return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Point an MSI GSI at a new (address, data), as the guest reprogrammed it.

        If KVM refuses the table, the old route stays (in KVM and here) and the error is raised.
        """
        old = self.msi.get(gsi)
        if old != (address, data):
            self.msi[gsi] = (address, data)
            try:
                self.commit()
            except PyvmmError:
                self.msi[gsi] = old
                raise

    def remove_msi(self, gsi: int) -> None:
        """Drop an MSI route and recycle its GSI (even if KVM refuses the smaller table)."""
        if self.msi.pop(gsi, None) is not None:
            self._free.append(gsi)
            self.commit()

    def commit(self) -> None:
        """Hand the whole table to KVM (KVM_SET_GSI_ROUTING)."""
        self.vm.set_gsi_routing(self._entries())


class MsiVector:
    """One MSI or MSI-X vector: an eventfd for VFIO, an irqfd into KVM on its own GSI.

    Masking detaches the irqfd: signals then wait in the eventfd's counter, and the irqfd
    delivers them when it is attached again on unmask, as a pending bit would.
    """

    def __init__(self, vm: Vm, routing: GsiRouting, address: int, data: int) -> None:
        self.vm = vm
        self.routing = routing
        self.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.gsi = routing.add_msi(address, data)
        except BaseException:
            os.close(self.eventfd)
            raise
        self.attached = False

    def route(self, address: int, data: int) -> None:
        """Follow the guest's new message address and data."""
        self.routing.set_msi(self.gsi, address, data)

    def set_masked(self, masked: bool) -> None:
        """Attach (unmasked) or detach (masked) the irqfd."""
        if masked and self.attached:
            self.vm.irqfd_deassign(self.eventfd, self.gsi)
            self.attached = False
        elif not masked and not self.attached:
            self.vm.irqfd(self.eventfd, self.gsi)
            self.attached = True

    def close(self) -> None:
        """Detach, drop the route, close the eventfd: each step even if one before failed.

        Closing the eventfd also ends an irqfd that KVM would not deassign.
        """
        if self.eventfd < 0:
            return
        try:
            self.set_masked(True)
        finally:
            try:
                self.routing.remove_msi(self.gsi)
            finally:
                os.close(self.eventfd)
                self.eventfd = -1
                self.attached = False


class IntxLine:
    """INTx of a VFIO device: trigger eventfd -> KVM irqfd with resample -> VFIO unmask.

    Most devices take the resample eventfd as VFIO's unmask eventfd, so the whole cycle stays
    in the kernel. Some (the kernel's mtty sample) refuse it; then a thread waits on the
    resample eventfd and issues the unmask ioctl after each EOI, as QEMU falls back to.
    """

    def __init__(self, device: VfioDevice, vm: Vm, gsi: int) -> None:
        self.device, self.vm, self.gsi = device, vm, gsi
        self.trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.thread: threading.Thread | None = None
        self.enabled = False

    def enable(self) -> None:
        """Wire the line from the device to the guest's GSI; on failure, nothing stays wired."""
        self.device.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [self.trigger])
        try:
            self.vm.irqfd(self.trigger, self.gsi, resample_fd=self.resample)
        except PyvmmError:
            with contextlib.suppress(PyvmmError):
                self.device.set_irqs(INTX, NONE_TRIGGER, 0, 0)
            raise
        self.enabled = True
        unmask = lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_UNMASK
        try:
            self.device.set_irqs(INTX, unmask, 0, 1, [self.resample])
        except VfioIoctlError as error:
            if error.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                with contextlib.suppress(PyvmmError):
                    self.disable()
                raise
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._unmask_loop, name=f"intx-unmask {self.device.name}", daemon=True
                )
                self.thread.start()

    def _unmask_loop(self) -> None:
        poller = select.poll()
        poller.register(self.resample, select.POLLIN)
        poller.register(self.stop, select.POLLIN)
        unmask = lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_UNMASK
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self.stop in ready:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.resample)
                if self.enabled:
                    with contextlib.suppress(PyvmmError):
                        self.device.set_irqs(INTX, unmask, 0, 1)

    def disable(self) -> None:
        """Disconnect the line (MSI or MSI-X take over, or teardown)."""
        if self.enabled:
            self.enabled = False
            try:
                self.device.set_irqs(INTX, NONE_TRIGGER, 0, 0)
            finally:
                self.vm.irqfd_deassign(self.trigger, self.gsi)

    def close(self) -> None:
        """Stop the unmask thread and close the eventfds."""
        with contextlib.suppress(PyvmmError, OSError):
            self.disable()
        if self.thread is not None:
            os.eventfd_write(self.stop, 1)
            self.thread.join()
            self.thread = None
        for fd in (self.trigger, self.resample, self.stop):
            os.close(fd)
        self.trigger = self.resample = self.stop = -1
