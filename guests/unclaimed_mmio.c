/*
 * Access to an MMIO address no device claims. The tests decide what the
 * VMM should do (return all-ones, return zero, stop the run); this guest
 * just prints what it read and then ends with a recognisable status.
 */
#include "runtime.h"

#define UNCLAIMED 0xE0000000UL   /* in the MMIO hole, outside the test windows */

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)ncpus;
	if (cpu != 0)
		guest_halt();

	print("touching unclaimed MMIO\n");
	u32 v = mmio_read32(UNCLAIMED);
	printf("read %08x\n", v);
	mmio_write32(UNCLAIMED, 0x12345678);
	guest_exit(2);  /* exit status (2 << 1) | 1 = 5 */
}
