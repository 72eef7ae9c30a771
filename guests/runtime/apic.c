/*
 * IDT, local APIC, IOAPIC and 8259 masking (see apic.h).
 */
#include "apic.h"

/* The IOAPIC has two registers: write a register number to IOREGSEL, then
 * read or write it through IOWIN. */
#define IOAPIC_IOREGSEL 0x00
#define IOAPIC_IOWIN 0x10
#define IOAPIC_VERSION 0x01  /* bits 23:16: the highest redirection entry */
#define IOAPIC_REDIRECTION(gsi) (0x10 + 2 * (gsi))  /* low dword; +1: high */
#define  IOAPIC_LEVEL 0x8000
#define  IOAPIC_MASKED 0x10000

#define PIC1_DATA 0x21
#define PIC2_DATA 0xA1

#define IA32_APIC_BASE 0x1B
#define  APIC_BASE_ENABLE 0x800

/* Type 0x8E: present, ring 0, interrupt gate; 32- or 64-bit by the mode
 * the CPU runs in, and so is the gate's size. */
#ifdef __x86_64__
struct idt_gate {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type;
	u16 offset_middle;
	u32 offset_high;
	u32 reserved;
} __attribute__((packed));
#else
struct idt_gate {
	u16 offset_low;
	u16 selector;
	u8 zero;
	u8 type;
	u16 offset_high;
} __attribute__((packed));
#endif

/* lidt's operand (and lgdt's): a limit, then a base of the word size. */
struct table_pointer {
	u16 limit;
	uptr base;
} __attribute__((packed));

static struct idt_gate idt[256];
volatile u32 ticks;

u32 lapic_read(u32 reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

void lapic_write(u32 reg, u32 v)
{
	mmio_write32(LAPIC_BASE + reg, v);
}

unsigned lapic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

void lapic_eoi(void)
{
	/* For a level-triggered vector the local APIC passes the EOI on to the
	 * IOAPIC, which then samples the line again. */
	lapic_write(LAPIC_EOI, 0);
}

static void timer_tick(void)
{
	ticks++;
	lapic_eoi();
}
INTERRUPT_HANDLER(timer_interrupt, timer_tick);

/* A spurious interrupt is not in service: it must not get an EOI. */
static void spurious(void)
{
}
INTERRUPT_HANDLER(spurious_interrupt, spurious);

#ifndef __x86_64__
/*
 * The end of every 32-bit INTERRUPT_HANDLER stub (see apic.h): the stack
 * holds what the interrupt pushed, EIP, CS, EFLAGS. Rearrange it into
 * EFLAGS, EIP and return with popfl; ret: CS stays what it is, which is
 * what iret would reload it with (one code segment, ring 0 only).
 */
__asm__("	.pushsection .text\n"
	"	.globl interrupt_return\n"
	"	.type interrupt_return, @function\n"
	"interrupt_return:\n"
	"	pushl %eax\n"
	"	movl 4(%esp), %eax\n"      /* EIP */
	"	xchgl %eax, 12(%esp)\n"    /* EIP where EFLAGS was; EAX = EFLAGS */
	"	movl %eax, 8(%esp)\n"      /* EFLAGS where CS was */
	"	popl %eax\n"
	"	addl $4, %esp\n"           /* drop the first EIP: EFLAGS, EIP remain */
	"	popfl\n"
	"	ret\n"
	"	.popsection\n");
#endif

void idt_set_gate(unsigned vector, interrupt_handler *handler)
{
	u64 address = (u64)(uptr)handler;

	idt[vector].offset_low = address & 0xFFFF;
	idt[vector].selector = KERNEL_CS;
	idt[vector].type = 0x8E;
#ifdef __x86_64__
	idt[vector].offset_middle = (address >> 16) & 0xFFFF;
	idt[vector].offset_high = address >> 32;
#else
	idt[vector].offset_high = (address >> 16) & 0xFFFF;
#endif
}

#ifndef __x86_64__
/* Null, then flat 4 GiB 32-bit code at KERNEL_CS and flat data at 0x10 (the
 * selector the boot loader's data segments already have). */
static const u64 gdt[] = {
	0,
	0x00CF9A000000FFFFull,
	0x00CF92000000FFFFull,
};

static void load_gdt(void)
{
	struct table_pointer pointer = { sizeof(gdt) - 1, (uptr)gdt };

	/* A far jump is the only way to reload CS; then the data segments,
	 * so that none of them still caches the loader's descriptors. */
	__asm__ volatile("lgdt %0\n\t"
			 "ljmp %1, $1f\n"
			 "1:\n\t"
			 "movl $0x10, %%eax\n\t"
			 "movl %%eax, %%ds\n\t"
			 "movl %%eax, %%es\n\t"
			 "movl %%eax, %%fs\n\t"
			 "movl %%eax, %%gs\n\t"
			 "movl %%eax, %%ss"
			 : : "m"(pointer), "i"(KERNEL_CS) : "eax", "memory");
}
#endif

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;

	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

void lapic_enable(void)
{
	u64 base = rdmsr(IA32_APIC_BASE);

	/* The APIC is globally enabled at reset, but make sure (the MSR), then
	 * software-enable it (SVR bit 8). */
	if (!(base & APIC_BASE_ENABLE))
		wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
	lapic_write(LAPIC_SVR, LAPIC_SVR_ENABLE | SPURIOUS_VECTOR);
	lapic_write(LAPIC_TPR, 0);
}

void lapic_send_ipi(unsigned apic_id, u32 command)
{
	lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
	lapic_write(LAPIC_ICR_LOW, command);
	while (lapic_read(LAPIC_ICR_LOW) & ICR_PENDING)
		__builtin_ia32_pause();
}

void interrupts_init(void)
{
	struct table_pointer pointer = { sizeof(idt) - 1, (uptr)idt };

#ifndef __x86_64__
	load_gdt();
#endif
	idt_set_gate(TIMER_VECTOR, timer_interrupt);
	idt_set_gate(SPURIOUS_VECTOR, spurious_interrupt);
	__asm__ volatile("lidt %0" : : "m"(pointer));

	/* The PICs would deliver GSIs 0-15 a second time, at vectors nobody
	 * set up (their reset base is 0: CPU exceptions): mask every line
	 * (OCW1) so only the IOAPIC delivers them. */
	outb(PIC1_DATA, 0xFF);
	outb(PIC2_DATA, 0xFF);

	lapic_enable();

	/* A periodic tick, so that a wait in HLT always wakes up to check its
	 * deadline. KVM's APIC timer counts at 1 GHz (1 ns per count) before
	 * the divider, so divide by 1 and count TICK_MS milliseconds. On other
	 * hypervisors the period differs; only the timeouts scale. */
	lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
	lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | TIMER_VECTOR);
	lapic_write(LAPIC_TIMER_INITIAL, TICK_MS * 1000000u);
}

static u32 ioapic_read(u32 reg)
{
	mmio_write32(IOAPIC_BASE + IOAPIC_IOREGSEL, reg);
	return mmio_read32(IOAPIC_BASE + IOAPIC_IOWIN);
}

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC_BASE + IOAPIC_IOREGSEL, reg);
	mmio_write32(IOAPIC_BASE + IOAPIC_IOWIN, v);
}

int ioapic_route(unsigned gsi, unsigned vector, int level)
{
	if (gsi > ((ioapic_read(IOAPIC_VERSION) >> 16) & 0xFF))
		return -1;
	/* Masked while half-written; the low dword goes last and unmasks.
	 * Destination: physical mode, this CPU's APIC ID in bits 63:56.
	 * Delivery fixed, active high: KVM's IOAPIC sees an assigned device's
	 * INTx as a line that is 1 while asserted. */
	ioapic_write(IOAPIC_REDIRECTION(gsi), IOAPIC_MASKED);
	ioapic_write(IOAPIC_REDIRECTION(gsi) + 1, lapic_id() << 24);
	ioapic_write(IOAPIC_REDIRECTION(gsi), vector | (level ? IOAPIC_LEVEL : 0));
	return 0;
}

void ioapic_mask(unsigned gsi)
{
	ioapic_write(IOAPIC_REDIRECTION(gsi), IOAPIC_MASKED);
}

int idle_wait(u32 start, u32 timeout_ms)
{
	if ((ticks - start) * TICK_MS >= timeout_ms)
		return 0;
	/* sti takes effect after the next instruction, so an interrupt that is
	 * already pending is taken right after hlt starts, not lost before it. */
	__asm__ volatile("sti; hlt; cli" ::: "memory");
	return 1;
}
