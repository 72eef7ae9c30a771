/*
 * The CPU model a guest sees: every CPUID leaf and subleaf it can find and
 * a list of MSRs, one line each, so that a host test can diff the model
 * pyvmm gives against QEMU's (-accel kvm -cpu host,-arch-capabilities).
 *
 *   cpuid LEAF.SUBLEAF EAX EBX ECX EDX
 *     the basic leaves 0..CPUID.0:EAX, the hypervisor leaves 0x40000000..
 *     CPUID.40000000:EAX and the extended ones 0x80000000..CPUID.80000000:
 *     EAX; subleaf 0 always, the subleaves of the leaves that have them
 *     (SUBLEAVES) where they are not all zero.
 *   msr INDEX VALUE | msr INDEX gp | msr INDEX counts
 *     rdmsr of each MSR in MSRS; "gp" if it faulted; "counts" for counters
 *     whose value changes between any two reads (only that it read).
 *
 * rdmsr of an MSR the CPU model lacks raises #GP. The handler does not
 * return with iret (the software KVM of the CI machines cannot emulate a
 * protected-mode iret): it reloads the stack pointer saved before the
 * rdmsr and jumps to the recovery label, as a longjmp would.
 * Multiboot, so the same kernel runs under QEMU's -kernel:
 *   pyvmm run mb_cpumodel
 *   qemu-system-x86_64 -machine q35 -accel kvm -cpu host,-arch-capabilities
 *       -kernel mb_cpumodel.elf -device isa-debug-exit,iobase=0xf4,iosize=4
 * Output ends with "mb_cpumodel: N leaves, M msrs", then power-off.
 */
#include "runtime.h"
#include "multiboot.h"
#include "cpuid.h"

#define GP_VECTOR 13
#define MAX_RANGE 0x60        /* leaves per range at most: a wild maximum stays short */

/* Leaves with subleaves (Intel SDM and AMD APM, CPUID), and how many to read. */
static const struct { u32 leaf, count; } SUBLEAVES[] = {
	{ 0x4, 16 }, { 0x7, 4 }, { 0xB, 8 }, { 0xD, 64 }, { 0xF, 4 }, { 0x10, 8 },
	{ 0x12, 8 }, { 0x14, 4 }, { 0x17, 4 }, { 0x18, 8 }, { 0x1D, 4 }, { 0x1F, 8 },
	{ 0x20, 4 }, { 0x23, 4 }, { 0x24, 4 }, { 0x8000001D, 8 }, { 0x80000020, 8 },
	{ 0x80000026, 8 },
};

static u32 subleaves(u32 leaf)
{
	for (unsigned i = 0; i < sizeof(SUBLEAVES) / sizeof(SUBLEAVES[0]); i++)
		if (SUBLEAVES[i].leaf == leaf)
			return SUBLEAVES[i].count;
	return 1;
}

static u32 leaves_printed;

static void dump_range(u32 first)
{
	u32 last = cpuid(first, 0).eax;

	if (last < first || last - first >= MAX_RANGE)
		last = first + (last < first ? 0 : MAX_RANGE - 1);
	for (u32 leaf = first; leaf <= last; leaf++) {
		u32 count = subleaves(leaf);

		for (u32 sub = 0; sub < count; sub++) {
			struct regs r = cpuid(leaf, sub);

			if (sub && !(r.eax | r.ebx | r.ecx | r.edx))
				continue;
			printf("cpuid %08x.%u %08x %08x %08x %08x\n", leaf, sub, r.eax, r.ebx,
			       r.ecx, r.edx);
			leaves_printed++;
		}
	}
}

/* The MSRs a kernel commonly probes, architectural and KVM's own. */
static const u32 MSRS[] = {
	0x10, 0x11, 0x12, 0x17, 0x1B, 0x2A, 0x34, 0x3A, 0x3B, 0x48, 0x49, 0x8B, 0x9B,
	0xC1, 0xC2, 0xCE, 0xE7, 0xE8, 0xFE, 0x10A, 0x122, 0x140, 0x174, 0x175, 0x176,
	0x179, 0x17A, 0x186, 0x187, 0x198, 0x199, 0x19A, 0x1A0, 0x1D9, 0x1DB, 0x1DC,
	0x200, 0x201, 0x20E, 0x20F, 0x250, 0x258, 0x259, 0x268, 0x26F, 0x277, 0x2FF,
	0x309, 0x345, 0x38D, 0x38E, 0x38F, 0x390, 0x400, 0x401, 0x402, 0x403, 0x480,
	0x48D, 0x4D0, 0x560, 0x570, 0x6E0, 0x802, 0x808, 0xD90, 0xDA0, 0x1B01,
	0x4B564D00, 0x4B564D01, 0x4B564D02, 0x4B564D03, 0x4B564D04, 0x4B564D05,
	0x4B564D06, 0x4B564D07, 0x4B564D08,
	0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100,
	0xC0000101, 0xC0000102, 0xC0000103, 0xC0000104,
	0xC0010000, 0xC0010004, 0xC0010010, 0xC0010015, 0xC001001F, 0xC0010055,
	0xC0010058, 0xC0010062, 0xC0010064, 0xC0010114, 0xC0010117, 0xC0010140,
	0xC0010141, 0xC0010200, 0xC00102B1, 0xC0011005, 0xC0011020, 0xC0011021,
	0xC0011022, 0xC0011023, 0xC0011029, 0xC001102A,
};

/* Counters: the time stamp counter, MPERF and APERF, the fixed and general
 * performance counters, KVM's pre-wall-clock MSRs aside. */
static int counts(u32 index)
{
	return index == 0x10 || index == 0xE7 || index == 0xE8 || index == 0xC1 ||
	       index == 0xC2 || index == 0x309 || index == 0xC0010004;
}

/* Where a #GP in rdmsr_or_gp lands: its saved stack and its recovery point. */
u32 gp_recover_esp;
volatile u32 gp_taken;
extern char gp_handler[];

__asm__(
	".text\n"
	".globl gp_handler\n"
	"gp_handler:\n"
	"	movl gp_recover_esp, %esp\n"
	"	movl $1, gp_taken\n"
	"	jmp gp_recovered\n");

/* rdmsr that reports a fault instead of taking the kernel down. Not inlined:
 * the recovery label must exist once. */
static __attribute__((noinline)) int rdmsr_or_gp(u32 index, u64 *value)
{
	u32 low = 0, high = 0;

	gp_taken = 0;
	__asm__ volatile(
		"movl %%esp, gp_recover_esp\n"
		"rdmsr\n"
		".globl gp_recovered\n"
		"gp_recovered:\n"
		: "+a"(low), "+d"(high)
		: "c"(index)
		: "memory");
	*value = ((u64)high << 32) | low;
	return !gp_taken;
}

struct gate { u16 offset_low, selector; u8 zero, type; u16 offset_high; } __attribute__((packed));
static struct gate idt[32];

static void install_gp_handler(void)
{
	u16 cs;
	u32 address = (u32)(uptr)gp_handler;
	struct { u16 limit; u32 base; } __attribute__((packed)) pointer = {
		sizeof(idt) - 1, (u32)(uptr)idt
	};

	/* The boot loader's code selector: QEMU's option ROM and pyvmm differ. */
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	idt[GP_VECTOR] = (struct gate){ address & 0xFFFF, cs, 0, 0x8E, address >> 16 };
	__asm__ volatile("lidt %0" : : "m"(pointer));
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	u32 msrs = 0;

	(void)mbi;
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC)
		return 1;
	install_gp_handler();
	dump_range(0);
	if (cpuid(1, 0).ecx & (1u << 31))
		dump_range(0x40000000);
	dump_range(0x80000000);
	for (unsigned i = 0; i < sizeof(MSRS) / sizeof(MSRS[0]); i++, msrs++) {
		u64 value;

		if (!rdmsr_or_gp(MSRS[i], &value))
			printf("msr %08x gp\n", MSRS[i]);
		else if (counts(MSRS[i]))
			printf("msr %08x counts\n", MSRS[i]);
		else
			printf("msr %08x %016llx\n", MSRS[i], value);
	}
	printf("mb_cpumodel: %u leaves, %u msrs\n", leaves_printed, msrs);
	return 0;
}
