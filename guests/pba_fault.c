/*
 * The MSI-X pending bit array of a device that refuses accesses, then
 * accepts them again. With QEMU's NVMe controller (1b36:0010 or 8086:5845)
 * assigned, its controller never enabled, so no vector can be pending:
 *
 *  1. memory decode on; dword 0 of the PBA (MSI-X capability, PCI 3.0
 *     6.8.2.5) reads 0: no vector pending;
 *  2. a byte 1 to the fault switch port (0x530, the test's) asks the host
 *     to make the device refuse its BARs; the PBA dword must then read all
 *     ones (0xffffffff), as a PCI read that fails does on real hardware;
 *  3. a byte 0 to the switch ends the refusal; the dword reads 0 again.
 *
 * Touches nothing else in the BARs. Prints a line per step and ends with
 * guest_exit(DONE), status 45, a status of its own.
 */
#include "pci.h"

static const u16 nvme_ids[][2] = { { 0x8086, 0x5845 }, { 0x1b36, 0x0010 } };

#define MSIX_PBA 8             /* BAR index (BIR) in bits 2:0, offset above */
#define FAULT_SWITCH_PORT 0x530
#define ALL_ONES 0xffffffffu

enum failure { NOT_FOUND = PCI_NOT_FOUND, NO_MSIX, BAD_PBA_BAR, BAD_PBA, BAD_REFUSED_PBA,
	       BAD_RESTORED_PBA, DONE = 22 };

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct pci_dev dev;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	pci_require_any(nvme_ids, 2, &dev);
	u8 cap = pci_find_cap(&dev, PCI_CAP_ID_MSIX);

	if (!cap)
		fail(NO_MSIX, "msi-x capability", 0, PCI_CAP_ID_MSIX);
	u32 pba = pci_read32(&dev, cap + MSIX_PBA);
	uptr pba_bar = pci_require_memory_bar(&dev, pba & 7, BAD_PBA_BAR);
	uptr bits = pba_bar + (pba & ~7u);

	pci_command(&dev, PCI_COMMAND_MEMORY, 0);
	printf("pba_fault: pba in bar %u at 0x%x\n", pba & 7, pba & ~7u);
	expect(BAD_PBA, "pba dword 0", mmio_read32(bits), 0);

	outb(FAULT_SWITCH_PORT, 1);
	u32 refused = mmio_read32(bits);
	printf("pba_fault: refused: pba 0x%08x\n", refused);
	expect(BAD_REFUSED_PBA, "refused pba dword 0", refused, ALL_ONES);

	outb(FAULT_SWITCH_PORT, 0);
	expect(BAD_RESTORED_PBA, "restored pba dword 0", mmio_read32(bits), 0);
	print("pba_fault: restored: pba 0x00000000\n");
	guest_exit(DONE);
}
