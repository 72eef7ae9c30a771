/*
 * Jumps to an address with no RAM behind it. KVM cannot fetch the instruction and reports
 * an emulation failure (KVM_EXIT_INTERNAL_ERROR), which pyvmm must report, not hang on.
 */
#include "runtime.h"

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)cpu;
	(void)ncpus;
	print("jumping to 0xe0000000\n");
	((void (*)(void))0xE0000000UL)();
	return 1;
}
