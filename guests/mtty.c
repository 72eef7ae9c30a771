/*
 * Drives the kernel's mtty sample mdev (samples/vfio-mdev/mtty.c): an
 * emulated 16550-style serial port behind an 8-port I/O BAR, whose
 * transmitter loops back into its own receive FIFO, with INTx only.
 *
 * What this proves is the VMM's INTx unmasking: mtty's INTx is "automasked"
 * (VFIO_IRQ_INFO_AUTOMASKED). Each time it fires, mtty masks it, and only
 * an unmask through VFIO re-arms it; pyvmm does that after the guest's EOI.
 * Three rounds in a row each need a received-data interrupt, so a VMM that
 * never unmasks fails the second round.
 */
#include "apic.h"
#include "pci.h"

/* mtty.c writes 0x32534348 to config offset 0: vendor 0x4348, device 0x3253
 * (the IDs of a WCH CH352 dual serial card). */
#define MTTY_VENDOR 0x4348
#define MTTY_DEVICE 0x3253

/* 16550 registers, offsets from the I/O BAR. */
#define UART_RBR 0           /* read: received byte */
#define UART_THR 0           /* write: byte to send (mtty: to its own FIFO) */
#define UART_IER 1
#define  IER_RECEIVED_DATA 0x01
#define UART_FCR 2           /* write only */
#define  FCR_ENABLE 0x01     /* mtty: FIFO of 16 bytes (1 without it) */
#define  FCR_CLEAR_RX 0x02
#define  FCR_CLEAR_TX 0x04   /* trigger level bits 7:6 = 00: one byte */
#define UART_LCR 3
#define  LCR_8N1 0x03        /* and DLAB (bit 7) clear: offset 0 is data */
#define UART_LSR 5
#define  LSR_DATA_READY 0x01

#define MTTY_VECTOR 0x30
#define SETTLE_MS 100

enum failure {
	NOT_FOUND = PCI_NOT_FOUND, NOT_IO_BAR, BAD_INTX_ROUTE, RX_TIMEOUT, NO_INTERRUPT, BAD_DATA,
};

static u16 port;
static volatile u32 irq_count;
static volatile u32 rx_len;
static volatile char rx[32];

/* Read every byte the FIFO holds (bounded: it holds 16 at most), then EOI. */
__attribute__((interrupt)) static void mtty_interrupt(struct interrupt_frame *frame)
{
	(void)frame;
	irq_count++;
	for (int n = 0; n < 64 && (inb(port + UART_LSR) & LSR_DATA_READY); n++) {
		char c = (char)inb(port + UART_RBR);

		if (rx_len < sizeof(rx))
			rx[rx_len++] = c;
	}
	lapic_eoi();
}

/* Send "pingN", wait until all of it is back, and check it. */
static void round_trip(u32 n)
{
	char text[] = "pingN";
	u32 len = sizeof(text) - 1, irqs = irq_count, start = ticks;

	text[4] = (char)('0' + n);
	rx_len = 0;
	/* No wait for THRE between bytes: in mtty it means "FIFO empty", which
	 * stays false while our own bytes sit in it. 5 bytes fit in 16. */
	for (u32 i = 0; i < len; i++)
		outb(port + UART_THR, (u8)text[i]);
	/* mtty raises the interrupt when the FIFO reaches the trigger level
	 * (one byte), so usually once per round; take bytes as they come. */
	while (rx_len < len)
		if (!idle_wait(start, TIMEOUT_MS))
			fail(RX_TIMEOUT, "bytes received", rx_len, len);
	expect(NO_INTERRUPT, "received-data interrupts", irq_count > irqs, 1);
	for (u32 i = 0; i < len; i++)
		expect(BAD_DATA, "received byte", (u8)rx[i], (u8)text[i]);
	printf("mtty rx irq %u ok: \"%s\" (interrupts: %u)\n", n, text, irq_count - irqs);
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct pci_dev dev;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	pci_require(MTTY_VENDOR, MTTY_DEVICE, &dev);

	struct pci_bar bar0 = pci_read_bar(&dev, 0);
	u8 gsi = pci_read8(&dev, PCI_INTERRUPT_LINE);

	if (!bar0.io || bar0.address == 0 || bar0.address > 0xFFF8) {
		printf("FAIL: bar0 (got 0x%llx, want 8 I/O ports)\n", bar0.address);
		guest_exit(NOT_IO_BAR);
	}
	port = (u16)bar0.address;
	printf("mtty: found %04x:%04x at ", MTTY_VENDOR, MTTY_DEVICE);
	pci_print_location(&dev);
	printf(", ports 0x%x-0x%x, interrupt line %u\n", port, port + 7, gsi);

	/* I/O decoding on (mtty itself ignores command writes; pyvmm may not).
	 * INTx must stay enabled: it is mtty's only interrupt. */
	pci_command(&dev, PCI_COMMAND_IO, PCI_COMMAND_INTX_DISABLE);
	interrupts_init();
	idt_set_gate(MTTY_VECTOR, mtty_interrupt);

	/* The port: interrupts off while setting up; FIFO on and both halves
	 * cleared (an earlier user may have left bytes); 8N1 with DLAB clear;
	 * then the received-data interrupt. mtty needs no divisor and no MCR
	 * (it only looks at MCR for modem-status interrupts). */
	outb(port + UART_IER, 0);
	outb(port + UART_FCR, FCR_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX);
	outb(port + UART_LCR, LCR_8N1);
	outb(port + UART_IER, IER_RECEIVED_DATA);

	/* INTx is level-triggered: the EOI of a level-triggered IOAPIC entry is
	 * what tells KVM, and through it pyvmm, to unmask. */
	if (ioapic_route(gsi, MTTY_VECTOR, 1))
		fail(BAD_INTX_ROUTE, "interrupt line is an ioapic input", gsi, 16);

	for (u32 n = 1; n <= 3; n++) {
		/*
		 * A real INTx line stays asserted until serviced; mtty's does not.
		 * It fires once, when the first byte arrives, and a firing while
		 * still masked is lost. The VMM unmasks only after our EOI, on its
		 * own thread, so give it a moment before the next round.
		 */
		if (n > 1) {
			u32 start = ticks;

			while (idle_wait(start, SETTLE_MS))
				;
		}
		round_trip(n);
	}
	print("mtty: all ok\n");
	return 0;
}
