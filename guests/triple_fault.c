/*
 * Triple fault on purpose, to test how the VMM reports KVM_EXIT_SHUTDOWN.
 *
 * With an empty IDT (limit 0) no exception can be delivered: ud2 raises
 * #UD, whose IDT entry is out of bounds, which raises #GP, which cannot be
 * delivered either, which escalates to #DF, which fails too: a triple
 * fault. Real hardware resets; KVM stops the vCPU with a shutdown exit.
 */
#include "runtime.h"

struct __attribute__((packed)) idt_ptr {
	u16 limit;
	uptr base;
};

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)ncpus;
	if (cpu != 0)
		guest_halt();

	print("about to triple-fault\n");

	static const struct idt_ptr empty = { 0, 0 };
	__asm__ volatile("lidt %0; ud2" :: "m"(empty));
	return 1;  /* not reached: if it were, exit status 3 says so */
}
