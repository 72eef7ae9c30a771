"""INTx as a PC OS without ACPI takes it, on the rig's edu and mtty, sharing one line.

edu goes to slot 1 and mtty to slot 2, so both INTA pins land on IRQ 10 (docs/guest-abi.md):
one guest run per controller and VFIO path takes ROUNDS interrupts from each device, then
ROUNDS with both raised at once, through the 8259s (intx_pic: the interrupt line register,
the ELCR) or the IOAPIC (intx_ioapic: the MP table, checked against the MADT). Each device's
resample eventfd is on GSI 10: after one EOI, KVM notifies both, and each gets its unmask.
"""

from __future__ import annotations

import re

import pytest

from tests.test_rig_assign import GUEST_TIMEOUT, pyvmm, rig_env, trace_lines

pytestmark = pytest.mark.rig
ROUNDS = 3


@pytest.mark.parametrize(
    ("guest", "path"),
    [("intx_pic", "group"), ("intx_pic", "cdev"), ("intx_ioapic", "group"),
     ("intx_ioapic", "cdev")],
)  # fmt: skip
def test_edu_and_mtty_share_irq_10(guest: str, path: str) -> None:
    edu, mtty = rig_env("PYVMM_RIG_EDU"), rig_env("PYVMM_RIG_MTTY")
    done = pyvmm(
        "run", guest, "--device", edu, "--device", mtty, "--vfio", path,
        "--timeout", str(GUEST_TIMEOUT), "--trace",
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"intx: edu at 00:01\.0, pin A, interrupt line 10", out), out
    assert re.search(r"intx: mtty at 00:02\.0, pin A, interrupt line 10", out), out
    if guest == "intx_pic":
        assert "intx: edu: 8259 irq 10, elcr 0x0c00" in out, out
        assert "intx: edu and mtty share irq 10" in out, out
    else:
        assert "intx: edu: mp table: pci slot 1 pin A -> ioapic pin 10, flags 0x1" in out, out
        assert "intx: mtty: madt: irq 10 -> gsi 10, level, active high" in out, out
        assert "intx: edu and mtty share ioapic pin 10" in out, out
    for n in range(1, ROUNDS + 1):
        for line in (f"edu intx {n} ok", f"mtty intx {n} ok", f"both intx {n} ok"):
            assert line in out, out
    assert "intx: all ok" in out, out
    # Both devices' INTx: an irqfd with a resample eventfd each, on the one GSI.
    trace = trace_lines(done.stderr)
    resampled = [
        line
        for line in trace
        if re.search(r"KVM_IRQFD\(fd=\d+, gsi=10, KVM_IRQFD_FLAG_RESAMPLE", line)
    ]
    assert len(resampled) == 2, "\n".join(trace)
