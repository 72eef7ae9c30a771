/*
 * SMP smoke test. All vCPUs enter at once; each reports in, and vCPU 0
 * waits for everyone before powering off. Nothing here needs interrupts
 * or IPIs: shared memory and atomics are enough, which is all a VMM
 * without an interrupt controller can offer.
 */
#include "runtime.h"

static spinlock_t print_lock;
static volatile u32 reported;

int guest_main(unsigned cpu, unsigned ncpus)
{
	spin_lock(&print_lock);
	printf("cpu %u of %u online\n", cpu, ncpus);
	spin_unlock(&print_lock);

	/* Counted after the line is out, so "all ... reported" comes last. */
	__atomic_fetch_add(&reported, 1, __ATOMIC_SEQ_CST);

	if (cpu != 0)
		guest_halt();  /* a halted vCPU with IF=0 is finished */

	while (__atomic_load_n(&reported, __ATOMIC_ACQUIRE) != ncpus)
		__builtin_ia32_pause();

	spin_lock(&print_lock);
	printf("all %u cpus reported\n", ncpus);
	spin_unlock(&print_lock);
	return 0;
}
