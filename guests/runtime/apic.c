/*
 * IDT, local APIC, IOAPIC and 8259 masking (see apic.h).
 */
#include "apic.h"

/* Local APIC registers (xAPIC: MMIO, one 32-bit register per 16 bytes). */
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080      /* task priority: 0 lets every vector in */
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0      /* spurious vector; bit 8 enables the APIC */
#define  LAPIC_SVR_ENABLE 0x100
#define LAPIC_LVT_TIMER 0x320
#define  LVT_TIMER_PERIODIC 0x20000
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3E0
#define  TIMER_DIVIDE_BY_1 0xB

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

struct idt_gate {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type;         /* 0x8E: present, ring 0, 64-bit interrupt gate */
	u16 offset_middle;
	u32 offset_high;
	u32 reserved;
} __attribute__((packed));

struct idt_pointer {
	u16 limit;
	u64 base;
} __attribute__((packed));

static struct idt_gate idt[256];
volatile u32 ticks;

static u32 lapic_read(u32 reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

static void lapic_write(u32 reg, u32 v)
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

__attribute__((interrupt)) static void timer_interrupt(struct interrupt_frame *frame)
{
	(void)frame;
	ticks++;
	lapic_eoi();
}

/* A spurious interrupt is not in service: it must not get an EOI. */
__attribute__((interrupt)) static void spurious_interrupt(struct interrupt_frame *frame)
{
	(void)frame;
}

void idt_set_gate(unsigned vector, interrupt_handler *handler)
{
	u64 address = (u64)(uptr)handler;

	idt[vector].offset_low = address & 0xFFFF;
	idt[vector].selector = 0x08;  /* the boot GDT's 64-bit code segment */
	idt[vector].type = 0x8E;
	idt[vector].offset_middle = (address >> 16) & 0xFFFF;
	idt[vector].offset_high = address >> 32;
}

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

void interrupts_init(void)
{
	struct idt_pointer pointer = { sizeof(idt) - 1, (u64)(uptr)idt };
	u64 base = rdmsr(IA32_APIC_BASE);

	idt_set_gate(TIMER_VECTOR, timer_interrupt);
	idt_set_gate(SPURIOUS_VECTOR, spurious_interrupt);
	__asm__ volatile("lidt %0" : : "m"(pointer));

	/* The PICs only matter for GSIs 0-15, which no device here uses: mask
	 * every line (OCW1) so nothing arrives through them. */
	outb(PIC1_DATA, 0xFF);
	outb(PIC2_DATA, 0xFF);

	/* The APIC is globally enabled at reset, but make sure (the MSR), then
	 * software-enable it (SVR bit 8). */
	if (!(base & APIC_BASE_ENABLE))
		wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
	lapic_write(LAPIC_SVR, LAPIC_SVR_ENABLE | SPURIOUS_VECTOR);
	lapic_write(LAPIC_TPR, 0);

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
