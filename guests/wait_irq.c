/*
 * Halts with interrupts enabled, waiting for an interrupt that never comes. Without an
 * in-kernel irqchip pyvmm reports that nothing can wake the vCPU; with one, KVM keeps the
 * vCPU halted in the kernel until the run's timeout.
 */
#include "runtime.h"

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)cpu;
	(void)ncpus;
	print("waiting for an interrupt\n");
	/* An empty IDT would triple-fault on delivery; nothing is ever delivered here. */
	__asm__ volatile("sti; hlt" ::: "memory");
	return 1;
}
