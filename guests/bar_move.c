/*
 * Sizes and moves the BAR of an assigned edu device (PCI 1234:11e8), as an OS's PCI code
 * does when it does not trust the firmware's placement.
 *
 * Sizing: with decoding off, write all ones to BAR0, read back the mask (edu's BAR0 is
 * 1 MiB: 0xFFF00000 plus the type bits), restore. Moving: with decoding off, write a new
 * address, turn decoding on, and find the device there, not at the old place (an address
 * nothing claims reads as all ones). The VMM must move the memory slot (or the trap) each
 * time the guest does this.
 */
#include "pci.h"

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define EDU_ID 0x010000ed
#define EDU_SIZE 0x100000u
#define NEW_PLACE 0xC8000000u   /* inside pyvmm's PCI memory window, unused */

enum failure { NOT_FOUND = PCI_NOT_FOUND, BAD_SIZE, NOT_RESTORED, NOT_MOVED, STILL_AT_OLD, NOT_BACK };

static u32 id_at(uptr address)
{
	return mmio_read32(address);
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct pci_dev dev;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	pci_require(EDU_VENDOR, EDU_DEVICE, &dev);
	u32 original = pci_read32(&dev, PCI_BAR0);
	uptr old = original & ~0xFu;

	pci_command(&dev, 0, PCI_COMMAND_MEMORY);
	pci_write32(&dev, PCI_BAR0, 0xFFFFFFFFu);
	u32 mask = pci_read32(&dev, PCI_BAR0);
	pci_write32(&dev, PCI_BAR0, original);
	expect(BAD_SIZE, "bar0 size", ~(mask & ~0xFu) + 1, EDU_SIZE);
	expect(NOT_RESTORED, "bar0 after sizing", pci_read32(&dev, PCI_BAR0), original);
	printf("bar_move: bar0 at 0x%llx, %u KiB\n", (u64)old, EDU_SIZE >> 10);

	pci_command(&dev, PCI_COMMAND_MEMORY, 0);
	expect(NOT_RESTORED, "id at the original place", id_at(old), EDU_ID);

	pci_command(&dev, 0, PCI_COMMAND_MEMORY);
	pci_write32(&dev, PCI_BAR0, NEW_PLACE | (original & 0xFu));
	pci_command(&dev, PCI_COMMAND_MEMORY, 0);
	expect(NOT_MOVED, "id at the new place", id_at(NEW_PLACE), EDU_ID);
	expect(STILL_AT_OLD, "the old place", id_at(old), 0xFFFFFFFFu);
	printf("bar_move: moved to 0x%x, old place empty\n", NEW_PLACE);

	/* Back again while decoding stays on: the mapping follows the register at once. */
	pci_write32(&dev, PCI_BAR0, original);
	expect(NOT_BACK, "id back at the original place", id_at(old), EDU_ID);
	expect(STILL_AT_OLD, "the new place after moving back", id_at(NEW_PLACE), 0xFFFFFFFFu);
	printf("bar_move: back at 0x%llx\n", (u64)old);
	return 0;
}
