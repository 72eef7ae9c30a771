/*
 * Waits for serial input on IRQ 4: remaps the 8259 PIC to vectors 0x20-0x2F, installs an
 * interrupt gate for vector 0x24, enables the UART's received-data interrupt and halts with
 * interrupts on. Needs pyvmm's in-kernel irqchip (--irqchip), whose vCPU 0 LAPIC accepts the
 * PIC's ExtINT as a PC's does.
 */
#include "runtime.h"

#define PIC1_COMMAND 0x20
#define PIC1_DATA 0x21
#define PIC2_COMMAND 0xA0
#define PIC2_DATA 0xA1
#define PIC_EOI 0x20
#define UART_VECTOR (0x20 + 4)
#define UART_IER (COM1_PORT + 1)
#define IER_RECEIVED_DATA 0x01

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
static volatile unsigned received;
static volatile char last;

struct interrupt_frame;

__attribute__((interrupt)) static void uart_interrupt(struct interrupt_frame *frame)
{
	(void)frame;
	while (inb(COM1_LSR) & 0x01) {
		last = (char)inb(COM1_PORT);
		received++;
	}
	outb(PIC1_COMMAND, PIC_EOI);
}

static void set_gate(unsigned vector, void (*handler)(struct interrupt_frame *))
{
	u64 address = (u64)(uptr)handler;

	idt[vector].offset_low = address & 0xFFFF;
	idt[vector].selector = 0x08;
	idt[vector].type = 0x8E;
	idt[vector].offset_middle = (address >> 16) & 0xFFFF;
	idt[vector].offset_high = address >> 32;
}

/* The classic 8259 initialisation: ICW1..ICW4, then masks that let only IRQ 4 through. */
static void remap_pic(void)
{
	outb(PIC1_COMMAND, 0x11);
	outb(PIC2_COMMAND, 0x11);
	outb(PIC1_DATA, 0x20);
	outb(PIC2_DATA, 0x28);
	outb(PIC1_DATA, 0x04);
	outb(PIC2_DATA, 0x02);
	outb(PIC1_DATA, 0x01);
	outb(PIC2_DATA, 0x01);
	outb(PIC1_DATA, (u8)~(1u << 4));
	outb(PIC2_DATA, 0xFF);
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct idt_pointer pointer = { sizeof(idt) - 1, (u64)(uptr)idt };

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	set_gate(UART_VECTOR, uart_interrupt);
	__asm__ volatile("lidt %0" : : "m"(pointer));
	remap_pic();
	print("waiting for input on IRQ 4\n");
	outb(UART_IER, IER_RECEIVED_DATA);
	/* sti takes effect after the next instruction, so no interrupt slips in before hlt. */
	while (!received)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	printf("irq 4 delivered '%c'\n", last);
	return 0;
}
