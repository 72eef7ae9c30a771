/*
 * Ending a run (docs/guest-abi.md, "Ending a run").
 *
 * Each function loops on "cli; hlt" after its port write: the write should
 * already have ended the run, but if a VMM lets the vCPU continue, parking
 * it is safer than running off into whatever follows.
 */
#include "runtime.h"

NORETURN void guest_halt(void)
{
	/* With interrupts off only an NMI can wake hlt; the loop covers that. */
	for (;;)
		__asm__ volatile("cli; hlt");
}

NORETURN void guest_exit(u8 v)
{
	outb(DEBUG_EXIT_PORT, v);
	guest_halt();
}

NORETURN void guest_poweroff(void)
{
	outw(PM1A_CNT_PORT, PM1A_SLP_EN);
	guest_halt();
}
