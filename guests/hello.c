/* The smallest long-mode guest: one line on the serial port, then power off. */
#include "runtime.h"

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)ncpus;
	if (cpu != 0)
		guest_halt();  /* with several vCPUs, only one says hello */
	print("Hello from a pyvmm guest!\n");
	return 0;          /* -> guest_poweroff() */
}
