/*
 * Register traffic for a benchmark: exactly 3000 accesses to the BAR of an
 * assigned edu device (PCI 1234:11e8, QEMU's docs/specs/edu.rst), checked.
 *
 * A test counts this guest's MMIO exits with the BAR mapped into the guest
 * (expect none) and with it trapped (expect exactly 3000). So nothing else
 * here touches MMIO: configuration space goes through ports 0xCF8/0xCFC
 * (mechanism #1, port exits only), there are no interrupts and no APIC.
 */
#include "pci.h"

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define EDU_ID 0x00        /* reads 0x010000ed */
#define EDU_LIVENESS 0x04  /* reads back the inverse of what was written */
#define ROUNDS 1000

enum failure { NOT_FOUND = PCI_NOT_FOUND, BAD_BAR0, BAD_ID, BAD_LIVENESS };

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct pci_dev dev;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	pci_require(EDU_VENDOR, EDU_DEVICE, &dev);
	uptr bar = pci_require_memory_bar(&dev, 0, BAD_BAR0);

	pci_command(&dev, PCI_COMMAND_MEMORY, 0);
	printf("edu_regs: bar0 0x%llx\n", (u64)bar);

	/* 1000 reads, then 1000 write + read pairs: 3000 accesses, each of them
	 * one 32-bit load or store (edu answers nothing else below 0x80). */
	for (u32 i = 0; i < ROUNDS; i++) {
		u32 id = mmio_read32(bar + EDU_ID);

		if (id != 0x010000ed)
			fail(BAD_ID, "id register", id, 0x010000ed);
	}
	for (u32 i = 0; i < ROUNDS; i++) {
		u32 v = i * 0x9E3779B9u;  /* a different bit pattern each time */

		mmio_write32(bar + EDU_LIVENESS, v);
		u32 back = mmio_read32(bar + EDU_LIVENESS);

		if (back != ~v)
			fail(BAD_LIVENESS, "liveness", back, ~v);
	}
	printf("edu_regs: %u accesses ok\n", 3 * ROUNDS);
	return 0;
}
