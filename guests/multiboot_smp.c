/*
 * SMP bring-up as an OS does it on a PC: the boot CPU starts the others
 * with INIT and SIPI through its local APIC, then counts who came up.
 *
 * Booted as a multiboot kernel, only the boot CPU runs; the others wait in
 * their reset state for INIT/SIPI (docs/guest-abi.md, "Multiboot"). The
 * command line says how many CPUs to expect ("cpus=N"; how many there are
 * is for the firmware tables to say, which this kernel does not read).
 *
 * A started AP begins in real mode at CS:IP = (vector << 8):0, that is at
 * physical vector << 12, so its first instructions must be below 1 MiB:
 * the boot CPU copies a small 16-bit trampoline to 0x8000 (vector 0x08).
 * Each AP records its APIC ID (CPUID leaf 1) in a bitmap, bumps a counter
 * and halts. Output:
 *   no AP ran before INIT/SIPI
 *   N cpus up, APIC IDs: 0 1 ...
 * then power-off. Failures: guest_exit(1..3).
 */
#include "runtime.h"
#include "multiboot.h"

#define LAPIC_BASE 0xFEE00000u
#define LAPIC_SVR 0x0F0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define SVR_ENABLE 0x100
#define ICR_PENDING (1u << 12)       /* delivery status: send pending */
#define ICR_INIT 0x00000500u
#define ICR_STARTUP 0x00000600u
#define ICR_ASSERT (1u << 14)
#define ICR_ALL_BUT_SELF (3u << 18)  /* destination shorthand */

/* The trampoline page and the two words the APs write, all below 1 MiB
 * (and below the multiboot information at 0x9000). */
#define TRAMPOLINE 0x8000u
#define AP_COUNT 0x8FF0u
#define AP_BITMAP 0x8FF4u

/* Busy-wait bounds, in loop iterations: this runs on a slow, emulated
 * KVM (~1.5 us per instruction), so 200000 is about a second. */
#define WAIT_FOR_APS 200000u
#define SETTLE 20000u

enum failure {
	BAD_MAGIC = 1,
	EARLY_AP,
	MISSING_APS,
};

/*
 * The APs' first code, copied to TRAMPOLINE. Real mode after INIT: CS is
 * the SIPI page, DS etc. 0, so AP_COUNT and AP_BITMAP are plain offsets.
 * Only relative jumps and absolute addresses: it runs wherever it is copied.
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
	"	lock btsl %ebx, " "0x8FF4" "\n"       /* AP_BITMAP */
	"	lock incl " "0x8FF0" "\n"             /* AP_COUNT */
	"1:	hlt\n"
	"	jmp 1b\n"
	"ap_trampoline_end:\n"
	"	.code32\n"
	"	.popsection\n");

extern const char ap_trampoline[], ap_trampoline_end[];

static volatile u32 *const ap_count = (volatile u32 *)AP_COUNT;
static volatile u32 *const ap_bitmap = (volatile u32 *)AP_BITMAP;

static void lapic_write(u32 reg, u32 value)
{
	mmio_write32(LAPIC_BASE + reg, value);
}

/* Send an IPI to every other CPU and wait until the APIC has sent it. */
static void send_to_others(u32 command)
{
	lapic_write(LAPIC_ICR_HIGH, 0);
	lapic_write(LAPIC_ICR_LOW, command | ICR_ALL_BUT_SELF);
	while (mmio_read32(LAPIC_BASE + LAPIC_ICR_LOW) & ICR_PENDING)
		__builtin_ia32_pause();
}

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

	*ap_count = 0;
	*ap_bitmap = 0;
	memcpy((void *)TRAMPOLINE, ap_trampoline, (uptr)(ap_trampoline_end - ap_trampoline));

	/* Nothing may run the trampoline before it is asked to. */
	for (volatile u32 i = 0; i < SETTLE; i++)
		;
	if (*ap_count) {
		print("FAIL: an AP ran before INIT/SIPI\n");
		return EARLY_AP;
	}
	print("no AP ran before INIT/SIPI\n");

	lapic_write(LAPIC_SVR, SVR_ENABLE | 0xFF);
	send_to_others(ICR_INIT | ICR_ASSERT);
	/* Twice, as the MP spec says (one is enough on KVM; a second one to a
	 * running CPU is ignored). */
	for (int i = 0; i < 2; i++)
		send_to_others(ICR_STARTUP | ICR_ASSERT | (TRAMPOLINE >> 12));

	for (u32 i = 0; i < WAIT_FOR_APS && *ap_count + 1 < expected; i++)
		__builtin_ia32_pause();
	/* A little longer, so that an AP too many is counted too. */
	for (volatile u32 i = 0; i < SETTLE; i++)
		;

	u32 bitmap = *ap_bitmap | 1;  /* the boot CPU is APIC ID 0 */
	unsigned up = *ap_count + 1;

	printf("%u cpus up, APIC IDs:", up);
	for (unsigned id = 0; id < 32; id++)
		if (bitmap & (1u << id))
			printf(" %u", id);
	print("\n");
	if (expected && up != expected) {
		printf("FAIL: expected %u cpus\n", expected);
		return MISSING_APS;
	}
	return 0;
}
