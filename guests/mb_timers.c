/*
 * Timer and device interrupts on the PC platform, set up as an OS sets
 * them up (docs/guest-abi.md, "Multiboot", "Firmware tables and CMOS"):
 *  - the 8259s masked, so that the ISA IRQs arrive through the IOAPIC only
 *    (their reset vector base is 0: a delivery would look like a CPU
 *    exception); their masks are read back, and the edge/level control
 *    register (ELCR, 0x4D0) keeps a level bit;
 *  - PIT channel 2 gated through port 0x61, its OUT2 bit seen to rise at
 *    the terminal count (how kernels calibrate the TSC);
 *  - the local APIC timer, periodic (runtime/apic.c's tick): at least
 *    LAPIC_TICKS interrupts, the wait bounded by the CMOS clock, which
 *    needs no interrupts;
 *  - the PIT, channel 0 periodic at 100 Hz: its IRQ 0 goes to the GSI the
 *    MADT's interrupt source override names (2 on a PC: the IOAPIC's pin 0
 *    is the 8259's INTR), routed edge-triggered in the IOAPIC; pin 0 is
 *    routed too, to another vector, and must stay silent;
 *  - COM1 on IRQ 4 (its GSI from the MADT too): interrupt-driven output,
 *    one byte per transmit-holding-register-empty interrupt, as a serial
 *    driver sends; the handler stops the interrupt after the last byte.
 * Every wait is bounded (apic.h's TIMEOUT_MS, by the local APIC tick).
 * Output: one line per check, "mb_timers: all ok" last, then power-off;
 * a failed check prints "FAIL: <what> (got X, want Y)" and exits with its
 * own code (enum failure).
 */
#include "runtime.h"
#include "multiboot.h"
#include "apic.h"
#include "tables.h"

enum failure {
	F_MAGIC = 1,
	F_MADT,
	F_PIC,
	F_LAPIC_TIMER,
	F_PIT,
	F_PIT_PIN_0,
	F_UART,
	F_ELCR,
	F_PIT_GATE,
};

#define PIC1_DATA 0x21
#define PIC2_DATA 0xA1
#define ELCR1 0x4D0                /* edge/level control of IRQs 0-7 (bit set: level) */
#define  ELCR_IRQ5 0x20

#define PIT_CHANNEL2 0x42
#define  PIT_CHANNEL2_MODE0 0xB0   /* channel 2, low then high byte, mode 0, binary */
#define SPEAKER_PORT 0x61
#define  SPEAKER_GATE2 0x01        /* gates PIT channel 2 */
#define  SPEAKER_DATA 0x02         /* speaker on: keep it off */
#define  SPEAKER_OUT2 0x20         /* channel 2's output, as kernels read it to time things */
#define PIT_GATE_COUNT 1193u        /* about 1 ms */
#define PIT_GATE_POLLS 1000000u

#define PIT_CHANNEL0 0x40
#define PIT_COMMAND 0x43
#define  PIT_RATE_GENERATOR 0x34   /* channel 0, low then high byte, mode 2, binary */
#define PIT_HZ 1193182u
#define PIT_RATE 100u

#define UART_IER (COM1_PORT + 1)
#define  IER_THRI 0x02             /* transmit holding register empty */
#define UART_IIR (COM1_PORT + 2)
#define  IIR_NO_INTERRUPT 0x01
#define  IIR_ID_MASK 0x0E
#define  IIR_THRI 0x02
#define UART_MCR (COM1_PORT + 4)
#define  MCR_OUT2 0x08             /* on a PC, gates the UART's IRQ line */
#define COM1_IRQ 4

#define PIT_VECTOR 0x30
#define PIN0_VECTOR 0x31
#define UART_VECTOR 0x34

#define LAPIC_TICKS 3
#define PIT_INTERRUPTS 3
#define RTC_SECONDS_BOUND 3        /* the local APIC timer gets this long */

static volatile u32 pit_interrupts, pin0_interrupts, uart_interrupts;

/* What the UART handler sends, a byte per interrupt, and how far it is. */
static const char uart_line[] = "uart: this line went out a byte per THR-empty interrupt\n";
static volatile u32 uart_sent;
static volatile int uart_done;

static void pit_tick(void)
{
	pit_interrupts++;
	lapic_eoi();
}
INTERRUPT_HANDLER(pit_interrupt, pit_tick);

static void pin0_tick(void)
{
	pin0_interrupts++;
	lapic_eoi();
}
INTERRUPT_HANDLER(pin0_interrupt, pin0_tick);

/*
 * The THR is empty: send the next byte, which empties again at once and
 * raises the next interrupt. Reading IIR acknowledges this one (the line
 * drops, so the next byte's interrupt is a new edge). After the last byte,
 * turn the interrupt off, as a driver with nothing left to send does.
 */
static void uart_thr_empty(void)
{
	u8 iir = inb(UART_IIR);

	uart_interrupts++;
	if (!(iir & IIR_NO_INTERRUPT) && (iir & IIR_ID_MASK) == IIR_THRI) {
		if (uart_sent < sizeof(uart_line) - 1) {
			outb(COM1_PORT, (u8)uart_line[uart_sent++]);
		} else {
			outb(UART_IER, 0);
			uart_done = 1;
		}
	}
	lapic_eoi();
}
INTERRUPT_HANDLER(uart_interrupt, uart_thr_empty);

/* The RTC's seconds register: a clock that runs without interrupts. */
static u8 rtc_seconds(void)
{
	outb(0x70, 0x00);
	return inb(0x71);
}

static void find_isa_routes(struct madt_info *madt)
{
	const u8 *rsdp = acpi_find_rsdp(), *root = rsdp ? acpi_root(rsdp) : 0;
	const u8 *table = root ? acpi_find_table(root, "APIC") : 0;

	guest_expect(F_MADT, "a MADT through the RSDP", table != 0, 1);
	madt_parse(table, madt);
	/* apic.c drives the IOAPIC at its architectural address. */
	guest_expect(F_MADT, "madt ioapic address", madt->ioapic_address, IOAPIC_BASE);
	guest_expect(F_MADT, "madt ioapic gsi base", madt->ioapic_gsi_base, 0);
	printf("madt: IOAPIC %u at 0x%x, %u overrides: IRQ 0 -> GSI %u (flags 0x%x), "
	       "IRQ 4 -> GSI %u\n", madt->ioapic_id, madt->ioapic_address, madt->overrides,
	       madt->isa_gsi[0], madt->isa_flags[0], madt->isa_gsi[COM1_IRQ]);
}

/* An ISA IRQ's trigger mode from its override flags (bits 3:2): 3 is level,
 * anything else edge, as ISA interrupts are. Polarity (bits 1:0) does not
 * matter to KVM's IOAPIC, which takes every line as active high. */
static int isa_level(const struct madt_info *madt, unsigned irq)
{
	return ((madt->isa_flags[irq] >> 2) & 3) == 3;
}

static void check_pics(void)
{
	u8 master = inb(PIC1_DATA), slave = inb(PIC2_DATA);

	guest_expect(F_PIC, "8259 master mask", master, 0xFF);
	guest_expect(F_PIC, "8259 slave mask", slave, 0xFF);
	printf("8259: both masked (IMR %02x %02x)\n", master, slave);
}

/* The 8259s' edge/level control registers (0x4D0/0x4D1), as PCI firmware sets them. */
static void check_elcr(void)
{
	u8 before = inb(ELCR1);

	outb(ELCR1, before | ELCR_IRQ5);
	guest_expect(F_ELCR, "elcr irq 5 level", inb(ELCR1) & ELCR_IRQ5, ELCR_IRQ5);
	outb(ELCR1, before);
	guest_expect(F_ELCR, "elcr restored", inb(ELCR1), before);
	printf("8259: ELCR keeps IRQ 5's level bit\n");
}

/* PIT channel 2 through port 0x61: the gate bit starts it, the OUT2 bit shows its terminal
 * count. Linux calibrates the TSC exactly this way. */
static void check_pit_gate(void)
{
	u32 polls = 0;

	outb(SPEAKER_PORT, (inb(SPEAKER_PORT) & ~SPEAKER_DATA) & ~SPEAKER_GATE2);
	outb(PIT_COMMAND, PIT_CHANNEL2_MODE0);
	outb(PIT_CHANNEL2, PIT_GATE_COUNT & 0xFF);
	outb(PIT_CHANNEL2, PIT_GATE_COUNT >> 8);
	guest_expect(F_PIT_GATE, "out2 low while counting", inb(SPEAKER_PORT) & SPEAKER_OUT2, 0);
	outb(SPEAKER_PORT, (inb(SPEAKER_PORT) & ~SPEAKER_DATA) | SPEAKER_GATE2);
	while (!(inb(SPEAKER_PORT) & SPEAKER_OUT2))
		if (++polls == PIT_GATE_POLLS)
			guest_fail(F_PIT_GATE, "out2 high after the count", 0, SPEAKER_OUT2);
	outb(SPEAKER_PORT, inb(SPEAKER_PORT) & ~SPEAKER_GATE2);
	printf("pit: channel 2 gated by port 0x61, OUT2 went high\n");
}

static void check_lapic_timer(void)
{
	u32 start = ticks, n;
	u8 second = rtc_seconds();
	unsigned changes = 0;

	/* Interrupts on, polling: a dead timer must not leave hlt waiting. */
	__asm__ volatile("sti" ::: "memory");
	while (ticks - start < LAPIC_TICKS && changes < RTC_SECONDS_BOUND) {
		u8 now = rtc_seconds();

		if (now != second) {
			second = now;
			changes++;
		}
	}
	__asm__ volatile("cli" ::: "memory");
	n = ticks - start;
	if (n < LAPIC_TICKS)
		guest_fail(F_LAPIC_TIMER, "lapic timer interrupts in 2-3 s", n, LAPIC_TICKS);
	printf("lapic timer: periodic, vector 0x%x, %u ms: at least %u interrupts\n",
	       lapic_read(LAPIC_LVT_TIMER) & 0xFF, TICK_MS, LAPIC_TICKS);
}

static void check_pit(const struct madt_info *madt)
{
	unsigned gsi = madt->isa_gsi[0];
	u16 divisor = PIT_HZ / PIT_RATE;
	u32 start = ticks;

	idt_set_gate(PIT_VECTOR, pit_interrupt);
	idt_set_gate(PIN0_VECTOR, pin0_interrupt);
	guest_expect(F_PIT, "ioapic route of IRQ 0's gsi",
		     ioapic_route(gsi, PIT_VECTOR, isa_level(madt, 0)), 0);
	if (gsi != 0)
		ioapic_route(0, PIN0_VECTOR, 0);
	outb(PIT_COMMAND, PIT_RATE_GENERATOR);
	outb(PIT_CHANNEL0, divisor & 0xFF);
	outb(PIT_CHANNEL0, divisor >> 8);
	while (pit_interrupts < PIT_INTERRUPTS)
		if (!idle_wait(start, TIMEOUT_MS))
			guest_fail(F_PIT, "pit interrupts within the timeout", pit_interrupts,
				   PIT_INTERRUPTS);
	/* Stop listening: the PIT runs on, its interrupts stay in the IOAPIC. */
	ioapic_mask(gsi);
	ioapic_mask(0);
	guest_expect(F_PIT_PIN_0, "interrupts at ioapic pin 0", pin0_interrupts, 0);
	printf("pit: channel 0 at %u Hz, IRQ 0 -> GSI %u: at least %u interrupts on vector "
	       "0x%x, %u at GSI 0\n", PIT_RATE, gsi, PIT_INTERRUPTS, PIT_VECTOR, pin0_interrupts);
}

static void check_uart(const struct madt_info *madt)
{
	unsigned gsi = madt->isa_gsi[COM1_IRQ];
	u32 start = ticks;

	idt_set_gate(UART_VECTOR, uart_interrupt);
	guest_expect(F_UART, "ioapic route of IRQ 4's gsi",
		     ioapic_route(gsi, UART_VECTOR, isa_level(madt, COM1_IRQ)), 0);
	outb(UART_MCR, inb(UART_MCR) | MCR_OUT2);
	/* From here until the handler is done nothing else may print: every
	 * byte written to the THR would raise an interrupt of its own. Enabling
	 * the interrupt with the THR empty raises the first one at once. */
	outb(UART_IER, IER_THRI);
	while (!uart_done)
		if (!idle_wait(start, TIMEOUT_MS)) {
			outb(UART_IER, 0);
			guest_fail(F_UART, "uart line sent within the timeout", uart_sent,
				   sizeof(uart_line) - 1);
		}
	ioapic_mask(gsi);
	/* One interrupt per byte, and the one that found nothing left. */
	guest_expect(F_UART, "uart interrupts", uart_interrupts, sizeof(uart_line));
	printf("uart: IRQ 4 -> GSI %u, vector 0x%x: %u THR-empty interrupts for %u bytes\n",
	       gsi, UART_VECTOR, uart_interrupts, uart_sent);
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	struct madt_info madt;

	(void)mbi;
	guest_expect(F_MAGIC, "multiboot magic", magic, MULTIBOOT_BOOTLOADER_MAGIC);
	find_isa_routes(&madt);
	interrupts_init();
	check_pics();
	check_elcr();
	check_pit_gate();
	check_lapic_timer();
	check_pit(&madt);
	check_uart(&madt);
	print("mb_timers: all ok\n");
	return 0;
}
