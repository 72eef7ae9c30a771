/* A guest that never ends on its own: for tests of --timeout, SIGTERM and Ctrl-C. */
#include "runtime.h"

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)ncpus;
	if (cpu == 0)
		print("spinning\n");
	for (;;)
		__asm__ volatile("pause");
}
