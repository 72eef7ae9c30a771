/* A guest that prints forever as fast as it can: for tests of a reader that stops reading. */
#include "runtime.h"

int guest_main(unsigned cpu, unsigned ncpus)
{
	static const char line[] = "flood flood flood flood flood flood flood flood flood flood\n";

	(void)ncpus;
	if (cpu != 0)
		for (;;)
			__asm__ volatile("cli; hlt");
	/* THR is written without polling LSR: one exit per byte, the most a guest can send. */
	for (;;)
		for (const char *c = line; *c; c++)
			outb(0x3F8, (unsigned char)*c);
}
