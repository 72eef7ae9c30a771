/*
 * The CPUID feature words a -cpu option edits, printed as QEMU's guest sees them:
 *   qemu-system-x86_64 -cpu host,-x2apic,+avx2 -kernel mb_cpu_flags.elf
 *   pyvmm-qemu         -cpu host,-x2apic,+avx2 -kernel mb_cpu_flags.elf
 * print the same lines on the same host. Leaf 1's OSXSAVE bit (ECX 27) mirrors
 * CR4, which the boot loader sets, so it is left out. With the word "triple"
 * in its command line the kernel then triple-faults (an empty IDT, then ud2),
 * so that a harness sees what -no-reboot does with a reset.
 */
#include "runtime.h"
#include "multiboot.h"
#include "cpuid.h"

static int has_word(const char *line, const char *word)
{
	for (const char *s = line; *s; s++) {
		if (s != line && s[-1] != ' ')
			continue;
		const char *w = word, *p = s;
		while (*w && *p == *w)
			w++, p++;
		if (!*w && (*p == ' ' || !*p))
			return 1;
	}
	return 0;
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	u32 max_basic = cpuid(0, 0).eax, max_extended = cpuid(0x80000000, 0).eax;
	struct regs r = cpuid(1, 0);

	printf("leaf 1 ecx %08x edx %08x\n", r.ecx & ~(1u << 27), r.edx);
	if (max_basic >= 7) {
		r = cpuid(7, 0);
		printf("leaf 7 ebx %08x ecx %08x edx %08x\n", r.ebx, r.ecx, r.edx);
	}
	if (max_extended >= 0x80000001) {
		r = cpuid(0x80000001, 0);
		printf("leaf 80000001 ecx %08x edx %08x\n", r.ecx, r.edx);
	}
	if (magic == MULTIBOOT_BOOTLOADER_MAGIC && (mbi->flags & MBI_CMDLINE) &&
	    has_word((const char *)(uptr)mbi->cmdline, "triple")) {
		static const struct { u16 limit; u32 base; } __attribute__((packed)) empty = {0, 0};
		print("mb_cpu_flags: triple fault\n");
		__asm__ volatile("lidt %0; ud2" : : "m"(empty));
	}
	return 0;
}
