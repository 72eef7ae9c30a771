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

NORETURN void guest_fail(u8 code, const char *what, u64 got, u64 want)
{
	printf("FAIL: %s (got 0x%llx, want 0x%llx)\n", what, got, want);
	guest_exit(code);
}

void guest_expect(u8 code, const char *what, u64 got, u64 want)
{
	if (got != want)
		guest_fail(code, what, got, want);
}
