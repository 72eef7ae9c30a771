/*
 * A BAR whose accesses the device refuses, then accepts again: what does the
 * guest see, and does it get to go on? With QEMU's edu device (1234:11e8,
 * docs/specs/edu.rst) assigned and its BAR0 trapped (--no-mmap):
 *
 *  1. memory decode on; the ID register reads 0x010000ed;
 *  2. a byte 1 written to the fault switch port (0x530, the test's) asks the
 *     host to make the device refuse BAR0 accesses; then the ID read, a
 *     liveness write and a liveness read: each must read all ones (0xffffffff),
 *     as a PCI read that fails does on real hardware;
 *  3. a byte 0 to the switch ends the refusal; the ID reads 0x010000ed again
 *     and liveness reads back the inverse of what is written.
 *
 * Prints a line per step and ends with guest_exit(DONE), status 43: a status
 * of its own, so a test can tell "the run went on to the end" from anything
 * the VMM could end it with. Only BAR0 at offsets 0x00 and 0x04, 32-bit.
 */
#include "pci.h"

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define EDU_ID 0x00
#define EDU_LIVENESS 0x04
#define EDU_ID_VALUE 0x010000ed
#define FAULT_SWITCH_PORT 0x530
#define ALL_ONES 0xffffffffu
#define PATTERN 0x12345678u

enum failure { NOT_FOUND = PCI_NOT_FOUND, BAD_BAR0, BAD_ID, BAD_REFUSED_ID,
	       BAD_REFUSED_LIVENESS, BAD_RESTORED_ID, BAD_RESTORED_LIVENESS, DONE = 21 };

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct pci_dev dev;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	pci_require(EDU_VENDOR, EDU_DEVICE, &dev);
	uptr bar = pci_require_memory_bar(&dev, 0, BAD_BAR0);

	pci_command(&dev, PCI_COMMAND_MEMORY, 0);
	expect(BAD_ID, "id register", mmio_read32(bar + EDU_ID), EDU_ID_VALUE);
	printf("bar_fault: id 0x%08x\n", EDU_ID_VALUE);

	outb(FAULT_SWITCH_PORT, 1);
	u32 id = mmio_read32(bar + EDU_ID);
	mmio_write32(bar + EDU_LIVENESS, PATTERN);
	u32 liveness = mmio_read32(bar + EDU_LIVENESS);
	printf("bar_fault: refused: id 0x%08x liveness 0x%08x\n", id, liveness);
	expect(BAD_REFUSED_ID, "refused id", id, ALL_ONES);
	expect(BAD_REFUSED_LIVENESS, "refused liveness", liveness, ALL_ONES);

	outb(FAULT_SWITCH_PORT, 0);
	expect(BAD_RESTORED_ID, "restored id", mmio_read32(bar + EDU_ID), EDU_ID_VALUE);
	mmio_write32(bar + EDU_LIVENESS, PATTERN);
	expect(BAD_RESTORED_LIVENESS, "restored liveness", mmio_read32(bar + EDU_LIVENESS),
	       ~PATTERN);
	printf("bar_fault: restored: id 0x%08x liveness ok\n", EDU_ID_VALUE);
	guest_exit(DONE);
}
