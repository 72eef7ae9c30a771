/*
 * SMP bring-up as an OS does it on a PC: the boot CPU starts the others
 * with INIT and SIPI through its local APIC, then counts who came up.
 *
 * Booted as a multiboot kernel, only the boot CPU runs; the others wait in
 * their reset state for INIT/SIPI (docs/guest-abi.md, "Multiboot"). The
 * command line says how many CPUs to expect ("cpus=N"; how many there are
 * is for the firmware tables to say, which this kernel does not read:
 * mb_platform does). It starts them all at once with the "all but self"
 * shorthand; the trampoline and the IPIs are runtime/smp.c's. Output:
 *   no AP ran before INIT/SIPI
 *   N cpus up, APIC IDs: 0 1 ...
 * then power-off. Failures: guest_exit(1..3).
 */
#include "runtime.h"
#include "multiboot.h"
#include "apic.h"
#include "smp.h"

enum failure {
	BAD_MAGIC = 1,
	EARLY_AP,
	MISSING_APS,
};

/* The N of "cpus=N" in the command line, or 0. */
static unsigned expected_cpus(const char *cmdline)
{
	for (const char *p = cmdline; *p; p++)
		if ((p == cmdline || p[-1] == ' ') && p[0] == 'c' && p[1] == 'p' && p[2] == 'u' &&
		    p[3] == 's' && p[4] == '=') {
			unsigned n = 0;

			for (p += 5; *p >= '0' && *p <= '9'; p++)
				n = n * 10 + (unsigned)(*p - '0');
			return n;
		}
	return 0;
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC || !(mbi->flags & MBI_CMDLINE)) {
		print("FAIL: not booted by a multiboot loader with a command line\n");
		return BAD_MAGIC;
	}
	unsigned expected = expected_cpus((const char *)(uptr)mbi->cmdline);

	smp_install_trampoline();
	/* Nothing may run the trampoline before it is asked to. */
	spin_delay(AP_SETTLE_SPINS);
	if (smp_aps_up()) {
		print("FAIL: an AP ran before INIT/SIPI\n");
		return EARLY_AP;
	}
	print("no AP ran before INIT/SIPI\n");

	lapic_enable();
	smp_start_all_aps();
	smp_wait_for_aps(expected ? expected - 1 : 0, AP_WAIT_SPINS);
	/* A little longer, so that an AP too many is counted too. */
	spin_delay(AP_SETTLE_SPINS);

	u64 ids = smp_ap_ids() | 1;  /* the boot CPU is APIC ID 0 */
	unsigned up = smp_aps_up() + 1;

	printf("%u cpus up, APIC IDs:", up);
	for (unsigned id = 0; id < 64; id++)
		if (ids & (1ull << id))
			printf(" %u", id);
	print("\n");
	if (expected && up != expected) {
		printf("FAIL: expected %u cpus\n", expected);
		return MISSING_APS;
	}
	return 0;
}
