/* hello.c for 32-bit protected mode: same runtime, built with -m32. */
#include "runtime.h"

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	print("Hello from 32-bit protected mode!\n");
	return 0;
}
