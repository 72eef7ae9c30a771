/*
 * Takes assigned devices' INTx the way a PC OS without ACPI does. One source,
 * built twice (guests/Makefile):
 *  - intx_pic (INTX_IOAPIC 0): the IRQ from the interrupt line register, on
 *    the 8259s. The ELCR must already mark it level-triggered (PC firmware,
 *    and pyvmm, set it for the IRQs they route PCI to); the guest sets the
 *    bit again itself, remaps the 8259s to vectors 0x40-0x4F, unmasks the
 *    line (and the cascade) and routes the 8259s through LINT0 (ExtINT).
 *    Each interrupt ends with an EOI to the slave and the master.
 *  - intx_ioapic (INTX_IOAPIC 1): the IOAPIC pin from the MP table's entry
 *    for the slot and pin, checked against the interrupt line register and
 *    the MADT's override for that IRQ (level-triggered), on a level-triggered
 *    redirection entry; each interrupt ends with a local APIC EOI.
 *
 * The devices are edu (1234:11e8, an interrupt on a register write) and mtty
 * (4348:3253, a received-data interrupt on a loopback byte), whichever are
 * there; one handler services every device, as an OS's shared handler does,
 * so two devices on one line (slots 1 and 2 share IRQ 10) both work. ROUNDS
 * interrupts from each device in turn, then ROUNDS with all raised at once.
 *
 * Every step prints a line; the first failure prints "FAIL: ..." and exits
 * with its own code (enum below).
 */
#include "apic.h"
#include "pci.h"
#include "tables.h"

#ifndef INTX_IOAPIC
#error "build with -DINTX_IOAPIC=0 (8259) or 1 (IOAPIC)"
#endif

#define ROUNDS 3
#define SETTLE_MS 100   /* mtty's unmask comes from pyvmm's thread after the EOI */

/* edu's BAR0 registers (docs/specs/edu.rst) */
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64
/* mtty's 16550 registers, from its I/O BAR */
#define UART_DATA 0
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_LSR 5
#define  LSR_DATA_READY 0x01

/* The 8259s: command and data ports, the edge/level control registers. */
#define PIC1_COMMAND 0x20
#define PIC1_DATA 0x21
#define PIC2_COMMAND 0xA0
#define PIC2_DATA 0xA1
#define PIC_EOI 0x20
#define ELCR1 0x4D0
#define ELCR2 0x4D1
#define PIC_VECTOR 0x40      /* IRQ n at 0x40 + n */
#define IOAPIC_VECTOR 0x40   /* IOAPIC pin n at 0x40 + n, n < 24 */
#define LAPIC_LVT_LINT0 0x350
#define  LVT_EXTINT 0x700

#define MPS_ACTIVE_HIGH_LEVEL 0xD

enum failure {
	NOT_FOUND = PCI_NOT_FOUND, NO_PIN, BAD_LINE, NOT_LEVEL, NO_MP_TABLE, NO_MP_ENTRY,
	MP_DISAGREES, MADT_DISAGREES, BAD_ROUTE, EDU_TIMEOUT, BAD_EDU_STATUS, MTTY_TIMEOUT,
	BAD_MTTY_DATA, NO_BAR,
};

struct device {
	const char *name;
	struct pci_dev pci;
	u8 present, line, pin;
	uptr base;             /* edu: BAR0 address; mtty: I/O port */
	volatile u32 count;    /* interrupts this device had something in */
};

static struct device edu = { .name = "edu" }, mtty = { .name = "mtty" };
static volatile u32 edu_status, rx_len, handled;
static volatile char rx[32];

static void end_of_interrupt(void)
{
#if INTX_IOAPIC
	lapic_eoi();
#else
	/* Non-specific EOIs; the slave's is harmless for an IRQ below 8. */
	outb(PIC2_COMMAND, PIC_EOI);
	outb(PIC1_COMMAND, PIC_EOI);
#endif
}

/* Every device on every line: each says whether it interrupted. */
static void service(void)
{
	handled++;
	if (edu.present) {
		u32 status = mmio_read32(edu.base + EDU_IRQ_STATUS);

		if (status) {
			edu_status = status;
			mmio_write32(edu.base + EDU_IRQ_ACK, status);
			edu.count++;
		}
	}
	if (mtty.present) {
		int got = 0;

		for (int n = 0; n < 64 && (inb(mtty.base + UART_LSR) & LSR_DATA_READY); n++) {
			char c = (char)inb(mtty.base + UART_DATA);

			if (rx_len < sizeof(rx))
				rx[rx_len++] = c;
			got = 1;
		}
		mtty.count += got;
	}
	end_of_interrupt();
}
INTERRUPT_HANDLER(intx_entry, service);

static void find(struct device *d, u16 vendor, u16 device_id)
{
	if (pci_find(vendor, device_id, &d->pci))
		return;
	d->present = 1;
	d->line = pci_read8(&d->pci, PCI_INTERRUPT_LINE);
	d->pin = pci_read8(&d->pci, PCI_INTERRUPT_PIN);
	printf("intx: %s at ", d->name);
	pci_print_location(&d->pci);
	printf(", pin %c, interrupt line %u\n", 'A' + d->pin - 1, d->line);
	if (d->pin < 1 || d->pin > 4)
		fail(NO_PIN, "interrupt pin", d->pin, 1);
	if (d->line > 15)
		fail(BAD_LINE, "interrupt line is an 8259 IRQ", d->line, 15);
}

#if INTX_IOAPIC
/* The MP table's pin for the device, which the MADT's override must agree with. */
static unsigned route(struct device *d)
{
	const u8 *floating = mp_find_floating();
	struct mp_info info;
	u8 ioapic_pin;
	u16 flags;

	if (!floating || mp_parse(floating, &info) != MP_OK)
		fail(NO_MP_TABLE, "mp table", 0, 1);
	if (mp_pci_interrupt(floating, d->pci.slot, d->pin, &ioapic_pin, &flags))
		fail(NO_MP_ENTRY, "mp table entry for the slot", d->pci.slot, d->pin);
	expect(MP_DISAGREES, "mp table pin = interrupt line", ioapic_pin, d->line);
	printf("intx: %s: mp table: pci slot %u pin %c -> ioapic pin %u, flags 0x%x\n", d->name,
	       d->pci.slot, 'A' + d->pin - 1, ioapic_pin, flags);

	const u8 *rsdp = acpi_find_rsdp();
	const u8 *madt = rsdp ? acpi_find_table(acpi_root(rsdp), "APIC") : 0;

	if (madt) {
		struct madt_info m;

		madt_parse(madt, &m);
		expect(MADT_DISAGREES, "madt gsi of the irq", m.isa_gsi[d->line], ioapic_pin);
		expect(MADT_DISAGREES, "madt flags of the irq", m.isa_flags[d->line],
		       MPS_ACTIVE_HIGH_LEVEL);
		printf("intx: %s: madt: irq %u -> gsi %u, level, active high\n", d->name, d->line,
		       m.isa_gsi[d->line]);
	}
	idt_set_gate(IOAPIC_VECTOR + ioapic_pin, intx_entry);
	if (ioapic_route(ioapic_pin, IOAPIC_VECTOR + ioapic_pin, 1))
		fail(BAD_ROUTE, "ioapic input", ioapic_pin, 23);
	return ioapic_pin;
}

static void controller_init(void)
{
}
#else
static u16 unmasked = 1 << 2;  /* the cascade */

static unsigned route(struct device *d)
{
	u16 elcr = inb(ELCR1) | inb(ELCR2) << 8;

	printf("intx: %s: 8259 irq %u, elcr 0x%04x\n", d->name, d->line, elcr);
	expect(NOT_LEVEL, "elcr bit of the irq (firmware sets it)", elcr >> d->line & 1, 1);
	elcr |= 1 << d->line;
	outb(ELCR1, elcr & 0xFF);
	outb(ELCR2, elcr >> 8);
	unmasked |= 1 << d->line;
	outb(PIC1_DATA, (u8)~unmasked);
	outb(PIC2_DATA, (u8)~(unmasked >> 8));
	return d->line;
}

/* ICW1-4: edge/level from the ELCR, vectors 0x40 and 0x48, the slave on IRQ 2, 8086 mode;
 * every line masked until route() opens one; the 8259s reach the CPU through LINT0. */
static void controller_init(void)
{
	outb(PIC1_COMMAND, 0x11);
	outb(PIC1_DATA, PIC_VECTOR);
	outb(PIC1_DATA, 1 << 2);
	outb(PIC1_DATA, 0x01);
	outb(PIC2_COMMAND, 0x11);
	outb(PIC2_DATA, PIC_VECTOR + 8);
	outb(PIC2_DATA, 2);
	outb(PIC2_DATA, 0x01);
	outb(PIC1_DATA, 0xFF);
	outb(PIC2_DATA, 0xFF);
	for (unsigned irq = 0; irq < 16; irq++)
		idt_set_gate(PIC_VECTOR + irq, intx_entry);
	lapic_write(LAPIC_LVT_LINT0, LVT_EXTINT);
}
#endif

static void settle(void)
{
	u32 start = ticks;

	while (idle_wait(start, SETTLE_MS))
		;
}

/* Raise what each present device can raise; value tags edu's interrupt. */
static void raise(int with_edu, int with_mtty, u32 value)
{
	if (with_mtty) {
		rx_len = 0;
		for (u32 i = 0; i < 5; i++)
			outb(mtty.base + UART_DATA, (u8)("ping0"[i] + (i == 4 ? value % 10 : 0)));
	}
	if (with_edu)
		mmio_write32(edu.base + EDU_IRQ_RAISE, value);
}

/* Wait until edu and/or mtty got their interrupt; check what each delivered. */
static void wait(int with_edu, int with_mtty, u32 value, u32 edu_before)
{
	u32 start = ticks;

	while ((with_edu && edu.count == edu_before) || (with_mtty && rx_len < 5))
		if (!idle_wait(start, TIMEOUT_MS)) {
			if (with_edu && edu.count == edu_before)
				fail(EDU_TIMEOUT, "edu interrupts", edu.count - edu_before, 1);
			fail(MTTY_TIMEOUT, "mtty bytes received", rx_len, 5);
		}
	if (with_edu)
		expect(BAD_EDU_STATUS, "edu status", edu_status, value);
	if (with_mtty)
		for (u32 i = 0; i < 5; i++)
			expect(BAD_MTTY_DATA, "mtty byte",
			       (u8)rx[i], (u8)("ping0"[i] + (i == 4 ? value % 10 : 0)));
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	find(&edu, 0x1234, 0x11e8);
	find(&mtty, 0x4348, 0x3253);
	if (!edu.present && !mtty.present) {
		print("FAIL: no edu (1234:11e8) or mtty (4348:3253) on bus 0\n");
		guest_exit(NOT_FOUND);
	}
	interrupts_init();
	controller_init();
	unsigned edu_input = 0, mtty_input = 0;

	if (edu.present) {
		edu.base = pci_require_memory_bar(&edu.pci, 0, NO_BAR);
		pci_command(&edu.pci, PCI_COMMAND_MEMORY, PCI_COMMAND_INTX_DISABLE);
		mmio_write32(edu.base + EDU_IRQ_ACK, 0xFFFFFFFF);  /* what an earlier user left */
		edu_input = route(&edu);
	}
	if (mtty.present) {
		struct pci_bar bar = pci_read_bar(&mtty.pci, 0);

		if (!bar.io || !bar.address)
			fail(NO_BAR, "mtty i/o bar", bar.address, 1);
		mtty.base = (uptr)bar.address;
		pci_command(&mtty.pci, PCI_COMMAND_IO, PCI_COMMAND_INTX_DISABLE);
		outb(mtty.base + UART_IER, 0);
		outb(mtty.base + UART_FCR, 0x07);  /* FIFO on, both halves cleared */
		outb(mtty.base + UART_LCR, 0x03);  /* 8N1, DLAB clear */
		outb(mtty.base + UART_IER, 0x01);  /* received-data interrupt */
		mtty_input = route(&mtty);
	}
	if (edu.present && mtty.present && edu_input == mtty_input)
		printf("intx: edu and mtty share %s %u\n", INTX_IOAPIC ? "ioapic pin" : "irq",
		       edu_input);

	for (u32 n = 1; n <= ROUNDS; n++) {
		if (edu.present) {
			u32 before = edu.count;

			raise(1, 0, 0x100 + n);
			wait(1, 0, 0x100 + n, before);
			printf("edu intx %u ok\n", n);
		}
		if (mtty.present) {
			raise(0, 1, n);
			wait(0, 1, n, 0);
			printf("mtty intx %u ok\n", n);
			settle();
		}
	}
	if (edu.present && mtty.present) {
		for (u32 n = 1; n <= ROUNDS; n++) {
			u32 before = edu.count, interrupts = handled;

			raise(1, 1, 0x200 + n);
			wait(1, 1, 0x200 + n, before);
			printf("both intx %u ok (%u interrupts)\n", n, handled - interrupts);
			settle();
		}
	}
	printf("intx: all ok (%u interrupts)\n", handled);
	return 0;
}
