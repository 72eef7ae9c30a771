"""The order rule under random use of pyvmm's public VFIO calls, on a real kernel (the rig).

A hypothesis state machine drives random sequences of the public calls of kvm.py, vfio.py
and iommufd.py: create and close VMs and their KVM-VFIO devices, open, duplicate and close
mtty_kvm's group file (group path) or cdev file (cdev path), register files (FILE_ADD),
open and close devices, close registrations (FILE_DEL). Refused calls are fine; pyvmm's own
refusals must reach no ioctl. After every step ``OrderChecker`` checks, from the kernel and
from pyvmm's --trace stream, that

- every open reached the driver with a kvm pointer (the kprobe on vfio_device_get_kvm_safe
  never sees NULL, and sees a kvm at each successful open; mtty_kvm refuses to open without
  one, so an open that succeeds is evidence too);
- no opening ioctl (VFIO_GROUP_GET_DEVICE_FD, VFIO_DEVICE_BIND_IOMMUFD) went to a file that
  was not registered at that moment;
- no FILE_DEL of a file (nor the close of the KVM-VFIO device, which drops every file) came
  before the close of a device opened from it.

The last tests show the same checker failing on a deliberate wrong order.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pyvmm.errors import KvmIoctlError, PyvmmError
from pyvmm.ioctl import open_node, trace_to
from pyvmm.iommufd import Iommufd
from pyvmm.kvm import Kvm, Vm
from pyvmm.vfio import (
    KvmVfioDevice,
    VfioContainer,
    VfioDevice,
    VfioDeviceCdev,
    VfioFile,
    VfioGroup,
    VfioOrderError,
    VfioRegistration,
)
from tests.test_rig_order import Probe, probe, rig_dev  # noqa: F401 (probe is a fixture)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

pytestmark = pytest.mark.rig
PATHS = ["group", "cdev"]
#: Bounded for the rig's speed: the two paths together run in a few minutes.
EXAMPLES = 50
STEPS = 20

#: Rule arguments that pick an object; see OrderMachine.pick.
PICK_ANY = 6
INDEX = st.integers(0, 2 * PICK_ANY - 1)

_FILE_ATTR = re.compile(
    r"KVM_SET_DEVICE_ATTR\(fd (\d+) kvm-vfio, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_(ADD|DEL), "
    r"fd -?\d+ (\S+)\) = (\S+)$"
)
_GROUP_OPEN = re.compile(r'VFIO_GROUP_GET_DEVICE_FD\(fd -?\d+ (\S+), "([^"]*)"\) = (\S+)$')
_CDEV_BIND = re.compile(r"VFIO_DEVICE_BIND_IOMMUFD\(fd -?\d+ (\S+), iommufd=.*\) = (\S+)$")
_GROUP_DEVICE_CLOSE = re.compile(r"close\(device (\S+), fd (\d+)\)$")
_CDEV_DEVICE_CLOSE = re.compile(r"close\(device (\S+), fd \d+ (\S+): released with the cdev\)$")
_KVM_VFIO_CLOSE = re.compile(r"close\(kvm-vfio, fd (\d+)\)$")


@dataclass
class OrderChecker:
    """Follows the --trace lines and the kprobe's kvm pointers; fails at a broken order."""

    #: Registered file (by path) -> the fd of the KVM-VFIO device that holds it.
    registered: dict[str, str] = field(default_factory=dict)
    #: Open device ("fd N" on the group path, the cdev path on the cdev path) -> its file.
    open_from: dict[str, str] = field(default_factory=dict)
    opens: int = 0

    def feed(self, lines: list[str]) -> None:
        """Check trace lines in order (with or without the "trace: " prefix)."""
        for line in lines:
            self._line(line.removeprefix("trace: "))

    def check_kvms(self, kvms: list[int], opened: int) -> None:
        """Check one step's kprobe hits, in which pyvmm opened `opened` devices."""
        assert all(kvms), f"a device open reached the driver without kvm (kprobe: {kvms})"
        assert len(kvms) >= opened, f"{opened} opens, but the kprobe saw only {kvms}"

    def _line(self, line: str) -> None:
        if match := _FILE_ATTR.search(line):
            kvm_vfio, op, path, result = match.groups()
            if result != "0":
                return
            if op == "ADD":
                self.registered[path] = kvm_vfio
            else:
                self._drop(path, f"FILE_DEL of {path}")
        elif match := _GROUP_OPEN.search(line):
            path, _name, result = match.groups()
            self._check_registered(path, line)
            if result.isdigit():
                self.open_from[f"fd {result}"] = path
                self.opens += 1
        elif match := _CDEV_BIND.search(line):
            path, result = match.groups()
            self._check_registered(path, line)
            if result == "0":
                self.open_from[path] = path
                self.opens += 1
        elif match := _GROUP_DEVICE_CLOSE.search(line):
            self.open_from.pop(f"fd {match.group(2)}", None)
        elif match := _CDEV_DEVICE_CLOSE.search(line):
            self.open_from.pop(match.group(2), None)
        elif match := _KVM_VFIO_CLOSE.search(line):
            for path, kvm_vfio in list(self.registered.items()):
                if kvm_vfio == match.group(1):
                    self._drop(path, f"closing the KVM-VFIO device (fd {kvm_vfio}) holding {path}")

    def _check_registered(self, path: str, line: str) -> None:
        assert path in self.registered, f"an open through {path}, not registered: {line}"

    def _drop(self, path: str, what: str) -> None:
        still_open = [device for device, source in self.open_from.items() if source == path]
        assert not still_open, f"{what} while {still_open} opened from it is still open"
        self.registered.pop(path, None)


def is_live(item: object) -> bool:
    """Whether a VM, KVM-VFIO device, file, registration or device is not closed."""
    if isinstance(item, KvmVfioDevice):
        return not item.closed
    if isinstance(item, VfioRegistration):
        return item.live
    return item.fd >= 0


def node_of(path: str) -> str:
    """mtty_kvm's VFIO file on this path."""
    device = rig_dev("mtty_kvm")
    return f"/dev/vfio/{device.group}" if path == "group" else device.cdev


@dataclass
class Totals:
    """What the state machine did, over all its examples (for the report, and to prove it
    did something)."""

    examples: int = 0
    steps: int = 0
    opens: int = 0
    refused: dict[str, int] = field(default_factory=dict)


def order_machine(path: str, kprobe: Probe, totals: Totals) -> type[RuleBasedStateMachine]:
    """The state machine class for one VFIO path."""
    node = node_of(path)
    name = rig_dev("mtty_kvm").name

    class OrderMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            totals.examples += 1
            self.stream = io.StringIO()
            self.seen = 0
            self.checker = OrderChecker()
            trace_to(self.stream)
            kprobe.clear()
            self.kvm = Kvm()
            self.vms: list[Vm] = []
            self.kvm_vfios: list[KvmVfioDevice] = []
            self.files: list[VfioFile] = []
            self.containers: list[VfioContainer] = []
            self.registrations: list[VfioRegistration] = []
            self.devices: list[VfioDevice] = []
            self.iommufd = Iommufd("/dev/iommu", open_node("/dev/iommu"))
            self.opened = 0

        # ---- helpers -------------------------------------------------------------------
        def attempt(self, call: Callable[[], object]) -> object | None:
            """Make one public call; a refusal is an outcome, pyvmm's own reaches no ioctl."""
            before = self.stream.tell()
            try:
                return call()
            except VfioOrderError as error:
                assert self.stream.getvalue()[before:] == "", (error, "reached the kernel")
                self.count(f"{type(error).__name__}: {str(error)[:50]}")
            except (PyvmmError, OSError) as error:
                self.count(f"{type(error).__name__}: {str(error)[:50]}")
            return None

        def count(self, what: str) -> None:
            totals.refused[what] = totals.refused.get(what, 0) + 1

        def pick(self, items: list, index: int):
            """Indexes below PICK_ANY choose among the live items (if any), so that deep
            sequences happen; the others among all, closed ones included."""
            live = [item for item in items if is_live(item)]
            if index < PICK_ANY and live:
                return live[index % len(live)]
            return items[index % len(items)]

        def open_file(self) -> VfioFile | None:
            if any(file.fd >= 0 for file in self.files):
                return None  # one file per node at a time: the checker names files by path
            try:
                fd = open_node(node)
            except OSError:
                self.count("OSError")
                return None
            file: VfioFile
            if path == "group":
                file = VfioGroup(node, fd)
                container = VfioContainer("/dev/vfio/vfio", open_node("/dev/vfio/vfio"))
                self.containers.append(container)
                file.set_container(container)
                container.set_iommu()
            else:
                file = VfioDeviceCdev(node, fd)
            self.files.append(file)
            return file

        # ---- rules ---------------------------------------------------------------------
        @initialize()
        def start(self) -> None:
            self.create_vm()
            self.create_kvm_vfio(0)
            self.open_file()

        @precondition(lambda self: len(self.vms) < 3)
        @rule()
        def create_vm(self) -> None:
            self.vms.append(self.kvm.create_vm())

        @precondition(lambda self: self.vms)
        @rule(i=INDEX)
        def close_vm(self, i: int) -> None:
            self.pick(self.vms, i).close()

        @precondition(lambda self: self.vms and len(self.kvm_vfios) < 4)
        @rule(i=INDEX)
        def create_kvm_vfio(self, i: int) -> None:
            vm = self.pick(self.vms, i)
            made = self.attempt(lambda: KvmVfioDevice(vm))
            if made is not None:
                self.kvm_vfios.append(made)

        @precondition(lambda self: self.kvm_vfios)
        @rule(i=INDEX)
        def close_kvm_vfio(self, i: int) -> None:
            self.attempt(self.pick(self.kvm_vfios, i).close)

        @precondition(lambda self: len(self.files) < 5)
        @rule()
        def open_another_file(self) -> None:
            self.open_file()

        @precondition(lambda self: any(f.fd >= 0 for f in self.files) and len(self.files) < 5)
        @rule(i=INDEX)
        def duplicate_file(self, i: int) -> None:
            file = self.pick([f for f in self.files if f.fd >= 0], i)
            self.files.append(type(file)(file.path, os.dup(file.fd)))

        @precondition(lambda self: self.files)
        @rule(i=INDEX)
        def close_file(self, i: int) -> None:
            self.attempt(self.pick(self.files, i).close)

        @precondition(lambda self: self.kvm_vfios and self.files)
        @rule(k=INDEX, i=INDEX)
        def add_file(self, k: int, i: int) -> None:
            kvm_vfio, file = self.pick(self.kvm_vfios, k), self.pick(self.files, i)
            made = self.attempt(lambda: kvm_vfio.add_file(file))
            if made is not None:
                self.registrations.append(made)

        @precondition(lambda self: self.registrations)
        @rule(i=INDEX)
        def open_device(self, i: int) -> None:
            self.open_through(self.pick(self.registrations, i))

        def open_through(self, registration: VfioRegistration) -> None:
            made = self.attempt(lambda: registration.open_device(name, self.iommufd.fd))
            if made is not None:
                assert isinstance(made, VfioDevice) and made.fd >= 0
                self.devices.append(made)
                self.opened += 1
                totals.opens += 1

        @precondition(lambda self: self.kvm_vfios and self.files)
        @rule(k=INDEX, i=INDEX)
        def add_file_and_open(self, k: int, i: int) -> None:
            """The usual sequence (a file and a KVM-VFIO device where none is live, FILE_ADD,
            open), so that opens happen often among the random steps."""
            if not any(is_live(file) for file in self.files) and len(self.files) < 5:
                self.open_file()
            if not any(is_live(kvm_vfio) for kvm_vfio in self.kvm_vfios):
                self.create_kvm_vfio(k)
            self.add_file(k, i)
            if self.registrations and self.registrations[-1].live:
                self.open_through(self.registrations[-1])

        @precondition(lambda self: self.devices)
        @rule(i=INDEX)
        def close_device(self, i: int) -> None:
            self.attempt(self.pick(self.devices, i).close)  # closing twice is allowed

        @precondition(lambda self: self.registrations)
        @rule(i=INDEX)
        def close_registration(self, i: int) -> None:
            self.attempt(self.pick(self.registrations, i).close)

        # ---- the checks ----------------------------------------------------------------
        @invariant()
        def order_kept(self) -> None:
            totals.steps += 1
            kvms, _ = kprobe.read()
            kprobe.clear()
            self.checker.check_kvms(kvms, self.opened)
            self.opened = 0
            text = self.stream.getvalue()
            self.checker.feed(text[self.seen :].splitlines())
            self.seen = len(text)
            for device in self.devices:
                if device.fd >= 0:  # open in pyvmm: its registration must be live
                    owner = [r for r in self.registrations if device in r.devices]
                    assert owner and owner[0].live and not owner[0].owner.closed, device.name

        def teardown(self) -> None:
            try:
                for kvm_vfio in self.kvm_vfios:
                    kvm_vfio.close()
                for file in self.files:
                    file.close()
                for handle in (*self.containers, *self.vms, self.iommufd, self.kvm):
                    handle.close()
                self.order_kept()
                assert not self.checker.registered and not self.checker.open_from
            finally:
                trace_to(None)

    return OrderMachine


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("path", PATHS)
def test_random_public_call_sequences_keep_the_order_rule(path: str, probe: Probe) -> None:  # noqa: F811
    totals = Totals()
    fds_before = open_fd_count()
    run_state_machine_as_test(
        order_machine(path, probe, totals),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    print(
        f"\n{path} path: {totals.examples} examples, {totals.steps} checked steps, "
        f"{totals.opens} device opens, refusals {totals.refused}"
    )
    assert totals.opens > 0, "no sequence opened a device: the test proved nothing"
    assert open_fd_count() == fds_before, "the sequences leaked file descriptors"


# ---- the checker can fail ------------------------------------------------------------------
libc = ctypes.CDLL(None, use_errno=True)
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
KVM_DEV_VFIO_FILE_DEL = 2


def test_checker_sees_an_open_before_file_add(probe: Probe) -> None:  # noqa: F811
    """The wrong order by direct ioctl (no pyvmm): mtty_kvm refuses, the kprobe sees NULL."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        kvm_vfio = KvmVfioDevice(vm)
        group = VfioGroup(node_of("group"), open_node(node_of("group")))
        container = VfioContainer("/dev/vfio/vfio", open_node("/dev/vfio/vfio"))
        try:
            group.set_container(container)
            container.set_iommu()
            probe.clear()
            name = ctypes.create_string_buffer(rig_dev("mtty_kvm").name.encode())
            fd = libc.ioctl(group.fd, ctypes.c_ulong(VFIO_GROUP_GET_DEVICE_FD), name)
            assert fd < 0 and ctypes.get_errno() == errno.EINVAL, "mtty_kvm opened without kvm"
            kvms, _ = probe.read()
            with pytest.raises(AssertionError, match="without kvm"):
                OrderChecker().check_kvms(kvms, 0)
        finally:
            group.close()
            container.close()
            kvm_vfio.close()


@pytest.mark.parametrize("path", PATHS)
def test_checker_sees_file_del_before_the_close(path: str, traced: io.StringIO) -> None:
    """FILE_DEL issued behind the registration's back, the device still open: caught."""
    node = node_of(path)
    with (
        Kvm() as kvm,
        kvm.create_vm() as vm,
        Iommufd("/dev/iommu", open_node("/dev/iommu")) as iommufd,
    ):
        kvm_vfio = KvmVfioDevice(vm)
        containers: list[VfioContainer] = []
        file: VfioFile
        if path == "group":
            file = VfioGroup(node, open_node(node))
            containers.append(VfioContainer("/dev/vfio/vfio", open_node("/dev/vfio/vfio")))
            file.set_container(containers[0])
            containers[0].set_iommu()
        else:
            file = VfioDeviceCdev(node, open_node(node))
        try:
            registration = kvm_vfio.add_file(file)
            assert registration.open_device(rig_dev("mtty_kvm").name, iommufd.fd).fd >= 0
            kvm_vfio._set_file(KVM_DEV_VFIO_FILE_DEL, file)  # deliberately, the device open
            with pytest.raises(AssertionError, match=r"FILE_DEL of .* while .* still open"):
                OrderChecker().feed(traced.getvalue().splitlines())
        finally:
            # The registration's own FILE_DEL finds nothing left to delete (ENOENT).
            with contextlib.suppress(KvmIoctlError):
                file.close()
            for container in containers:
                container.close()
            kvm_vfio.close()
