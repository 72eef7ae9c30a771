/*
 * Interrupts for the guests that take them: an IDT, the local APIC (with a
 * periodic timer that bounds every wait), the IOAPIC, and the 8259 PICs
 * kept out of the way. Built for both word sizes: the 64-bit guests that
 * drive an assigned device, and the 32-bit multiboot kernels, which also
 * start the other CPUs with IPIs (smp.h).
 *
 * With an assigned device, and on every multiboot boot, pyvmm creates
 * KVM's in-kernel irqchip (docs/guest-abi.md). Device interrupts reach the
 * CPU in two ways:
 *  - INTx and ISA IRQs: the line drives an IOAPIC input (for PCI, the GSI
 *    pyvmm stores in the interrupt line register; for ISA, the GSI the
 *    MADT's overrides give); the IOAPIC redirection entry for that input
 *    says which vector to raise on which CPU.
 *  - MSI / MSI-X: the device writes the vector number (data) to the local
 *    APIC's address (0xFEE00000 | APIC ID << 12). No IOAPIC involved.
 * Either way the handler ends with an EOI to the local APIC.
 */
#ifndef GUEST_APIC_H
#define GUEST_APIC_H

#include "runtime.h"

#define LAPIC_BASE 0xFEE00000u
#define IOAPIC_BASE 0xFEC00000u

/* Local APIC registers (xAPIC: MMIO, one 32-bit register per 16 bytes). */
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080      /* task priority: 0 lets every vector in */
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0      /* spurious vector; bit 8 enables the APIC */
#define  LAPIC_SVR_ENABLE 0x100
#define LAPIC_ICR_LOW 0x300  /* interrupt command: writing it sends the IPI */
#define LAPIC_ICR_HIGH 0x310 /* bits 31:24: the destination APIC ID */
#define  ICR_INIT 0x00000500u
#define  ICR_STARTUP 0x00000600u   /* | vector: start at vector << 12, real mode */
#define  ICR_PENDING (1u << 12)    /* delivery status: send pending */
#define  ICR_ASSERT (1u << 14)
#define  ICR_ALL_BUT_SELF (3u << 18)  /* destination shorthand */
#define LAPIC_LVT_TIMER 0x320
#define  LVT_TIMER_PERIODIC 0x20000
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3E0
#define  TIMER_DIVIDE_BY_1 0xB

/* The code segment of the interrupt gates: the 64-bit boot GDT's, and in
 * 32-bit code the runtime's own GDT's (interrupts_init loads it). */
#define KERNEL_CS 0x08

/* Vectors 0-31 are the CPU's exceptions; devices get 0x30 and up. */
#define TIMER_VECTOR 0x20
#define SPURIOUS_VECTOR 0xFF
#define TICK_MS 10     /* the timer's period */

/* The usual ceiling for a device wait: long enough for a nested, emulated
 * test rig, short enough that a broken device fails the guest quickly. */
#define TIMEOUT_MS 5000

/* gcc's interrupt attribute builds the entry and iretq around a handler:
 *	__attribute__((interrupt)) static void h(struct interrupt_frame *f)
 * (it needs -mgeneral-regs-only, which the Makefile gives everyone). */
struct interrupt_frame;
typedef void interrupt_handler(struct interrupt_frame *);

/*
 * INTERRUPT_HANDLER(name, function): an interrupt entry point called name
 * (for idt_set_gate) that runs void function(void), a plain static C
 * function, and returns from the interrupt; for code built for either
 * word size.
 *
 * 64-bit: gcc's interrupt attribute, as above. 32-bit: an assembly stub
 * that saves the registers around the call and returns through
 * interrupt_return, without iret: KVM's instruction emulator, which runs
 * protected-mode code where KVM has no hardware virtualization (this
 * project's CI machine), cannot emulate a protected-mode IRET ("instruction
 * emulation failed"). For a return to the same privilege level and code
 * segment, popfl; ret does what iret does.
 */
#ifdef __x86_64__
#define INTERRUPT_HANDLER(name, function)					\
	__attribute__((interrupt)) static void name(struct interrupt_frame *frame) \
	{									\
		(void)frame;							\
		function();							\
	}
#else
#define INTERRUPT_HANDLER(name, function)					\
	void name(struct interrupt_frame *);					\
	__attribute__((used)) static void function(void);			\
	__asm__("	.pushsection .text\n"					\
		"	.type " #name ", @function\n"				\
		#name ":\n"							\
		"	pushal\n"						\
		"	cld\n"							\
		"	call " #function "\n"					\
		"	popal\n"						\
		"	jmp interrupt_return\n"					\
		"	.popsection\n")
#endif

/* Timer ticks since interrupts_init(), TICK_MS apart. */
extern volatile u32 ticks;

/* Install an interrupt gate of the CPU's mode (interrupts off inside the handler). */
void idt_set_gate(unsigned vector, interrupt_handler *handler);

/* Load the IDT, mask both PICs, enable the local APIC and start its timer.
 * Interrupts stay off (EFLAGS.IF = 0) except inside idle_wait(). In 32-bit
 * code it first loads the runtime's own flat GDT: a multiboot loader's may
 * be anywhere (the spec says so), and every interrupt reloads CS from it. */
void interrupts_init(void);

/* The local APIC's registers, and turning it on without a timer or IDT
 * (all that sending IPIs needs). */
u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 v);
void lapic_enable(void);

/* Send an IPI (an ICR_* command) to APIC ID apic_id, or with
 * ICR_ALL_BUT_SELF in command to every other CPU; returns once sent. */
void lapic_send_ipi(unsigned apic_id, u32 command);

/* This CPU's APIC ID: where IOAPIC entries and MSIs are sent. */
unsigned lapic_id(void);
void lapic_eoi(void);

/* MSI and MSI-X message address for this CPU (fixed delivery, physical
 * destination); the message data is just the vector. */
static inline u32 msi_address(void)
{
	return LAPIC_BASE | (lapic_id() << 12);
}

/* Send IOAPIC input gsi to vector on this CPU, edge- or level-triggered,
 * active high, unmasked. Returns -1 if the IOAPIC has no such input. */
int ioapic_route(unsigned gsi, unsigned vector, int level);
void ioapic_mask(unsigned gsi);

/*
 * Halt until the next interrupt (a device's, or the next timer tick at the
 * latest). Returns 0, without halting, once timeout_ms have passed since
 * start (a value of ticks), so a wait loop reads:
 *
 *	u32 start = ticks;
 *	while (!done)
 *		if (!idle_wait(start, TIMEOUT_MS))
 *			fail(...);
 */
int idle_wait(u32 start, u32 timeout_ms);

#endif
