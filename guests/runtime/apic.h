/*
 * Interrupts for the guests that drive an assigned device: an IDT, the
 * local APIC (with a periodic timer that bounds every wait), the IOAPIC,
 * and the 8259 PICs kept out of the way.
 *
 * With an assigned device pyvmm always creates KVM's in-kernel irqchip
 * (docs/guest-abi.md, "PCI (with --device)"). Device interrupts reach the
 * CPU in two ways:
 *  - INTx: the device's pin drives an IOAPIC input (the GSI pyvmm stores in
 *    the interrupt line register); the IOAPIC redirection entry for that
 *    input says which vector to raise on which CPU.
 *  - MSI / MSI-X: the device writes the vector number (data) to the local
 *    APIC's address (0xFEE00000 | APIC ID << 12). No IOAPIC involved.
 * Either way the handler ends with an EOI to the local APIC.
 */
#ifndef GUEST_APIC_H
#define GUEST_APIC_H

#include "runtime.h"

#define LAPIC_BASE 0xFEE00000u
#define IOAPIC_BASE 0xFEC00000u

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

/* Timer ticks since interrupts_init(), TICK_MS apart. */
extern volatile u32 ticks;

/* Install a 64-bit interrupt gate (interrupts off inside the handler). */
void idt_set_gate(unsigned vector, interrupt_handler *handler);

/* Load the IDT, mask both PICs, enable the local APIC and start its timer.
 * Interrupts stay off (RFLAGS.IF = 0) except inside idle_wait(). */
void interrupts_init(void);

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
