/* Every vCPU spins with interrupts off: only the VMM's kick (a host signal) can end the run. */
#include "runtime.h"

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)ncpus;
	if (cpu == 0)
		print("spinning with interrupts off\n");
	__asm__ volatile("cli");
	for (;;)
		__asm__ volatile("pause");
}
