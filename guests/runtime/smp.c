/*
 * AP start-up by INIT/SIPI (see smp.h).
 */
#include "smp.h"
#include "apic.h"

/* The two words the APs write, in the trampoline's page (so that real-mode
 * code with DS = 0 reaches them as plain offsets): the count, and a 64-bit
 * bitmap of APIC IDs. The trampoline's asm repeats the numbers. */
#define AP_COUNT 0x8FE0u
#define AP_BITMAP 0x8FE8u

/*
 * The APs' first code, copied to AP_TRAMPOLINE. Real mode after INIT: CS is
 * the SIPI page, DS etc. 0. Only relative jumps and absolute addresses: it
 * runs wherever it is copied. bts with a register bit offset addresses a
 * bit string, so IDs past 31 land in the bitmap's second word.
 */
__asm__(
	"	.pushsection .text\n"
	"	.code16\n"
	"	.globl ap_trampoline, ap_trampoline_end\n"
	"ap_trampoline:\n"
	"	cli\n"
	"	xorw %ax, %ax\n"
	"	movw %ax, %ds\n"
	"	movl $1, %eax\n"
	"	cpuid\n"
	"	shrl $24, %ebx\n"                     /* EBX[31:24]: initial APIC ID */
	"	lock btsl %ebx, 0x8FE8\n"             /* AP_BITMAP */
	"	lock incl 0x8FE0\n"                   /* AP_COUNT */
	"1:	hlt\n"
	"	jmp 1b\n"
	"ap_trampoline_end:\n"
#ifdef __x86_64__
	"	.code64\n"
#else
	"	.code32\n"
#endif
	"	.popsection\n");

extern const char ap_trampoline[], ap_trampoline_end[];

static volatile u32 *const ap_count = (volatile u32 *)AP_COUNT;
static volatile u64 *const ap_bitmap = (volatile u64 *)AP_BITMAP;

void smp_install_trampoline(void)
{
	*ap_count = 0;
	*ap_bitmap = 0;
	memcpy((void *)AP_TRAMPOLINE, ap_trampoline, (uptr)(ap_trampoline_end - ap_trampoline));
}

unsigned smp_aps_up(void)
{
	return *ap_count;
}

u64 smp_ap_ids(void)
{
	return *ap_bitmap;
}

static void init_and_startup(unsigned apic_id, u32 shorthand)
{
	u32 startup = ICR_STARTUP | ICR_ASSERT | shorthand | (AP_TRAMPOLINE >> 12);

	lapic_send_ipi(apic_id, ICR_INIT | ICR_ASSERT | shorthand);
	for (int i = 0; i < 2; i++)
		lapic_send_ipi(apic_id, startup);
}

void smp_start_ap(unsigned apic_id)
{
	init_and_startup(apic_id, 0);
}

void smp_start_all_aps(void)
{
	init_and_startup(0, ICR_ALL_BUT_SELF);
}

unsigned smp_wait_for_aps(unsigned n, u32 spins)
{
	for (u32 i = 0; i < spins && *ap_count < n; i++)
		__builtin_ia32_pause();
	return *ap_count;
}

void spin_delay(u32 n)
{
	for (volatile u32 i = 0; i < n; i++)
		;
}
