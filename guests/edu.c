/*
 * Drives QEMU's "edu" teaching device (PCI 1234:11e8) assigned to the guest:
 * configuration space through both access mechanisms, registers, DMA both
 * ways, then interrupts as INTx and as MSI, three of each. The device is
 * described in QEMU's docs/specs/edu.rst and hw/misc/edu.c.
 *
 * Every step prints a line; the first failure prints "FAIL: ..." and exits
 * with its own code (enum below), so a test knows which step broke.
 */
#include "apic.h"
#include "pci.h"

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8

/* BAR0 registers. Below 0x80 edu only answers 4-byte accesses; the DMA
 * registers from 0x80 on are 64-bit (4-byte accesses work too). */
#define EDU_ID 0x00          /* 0xRRrr00ed: major, minor version */
#define EDU_LIVENESS 0x04    /* reads back the inverse of what was written */
#define EDU_FACTORIAL 0x08   /* write n, wait, read n! */
#define EDU_STATUS 0x20
#define  EDU_STATUS_COMPUTING 0x01
#define EDU_IRQ_STATUS 0x24  /* the OR of the values that raised it */
#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64     /* clears those bits; INTx drops at zero */
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_COUNT 0x90
#define EDU_DMA_CMD 0x98
#define  EDU_DMA_START 0x1
#define  EDU_DMA_TO_RAM 0x2  /* direction: 0 RAM -> edu, 1 edu -> RAM */

#define EDU_BUFFER 0x40000   /* the device's own 4 KiB, at this DMA address */
#define EDU_DMA_LIMIT (1u << 28)  /* edu's default DMA mask: 28 bits */
/*
 * Not the whole 4 KiB: QEMU 7.2's edu checks that the transfer's end lies strictly inside its
 * buffer (an off-by-one), and a transfer ending exactly at 0x41000 aborts QEMU (hw_error).
 */
#define DMA_SIZE 2048

#define INTX_VECTOR 0x30
#define MSI_VECTOR 0x31

enum failure {
	NOT_FOUND = PCI_NOT_FOUND, ECAM_MISMATCH, BAD_BAR0,               /* step 1 */
	BAD_ID, BAD_LIVENESS, FACTORIAL_TIMEOUT, BAD_FACTORIAL, /* 2 */
	DMA_OUT_OF_REACH, DMA_TIMEOUT, DMA_MISMATCH,          /* 3 */
	BAD_INTX_ROUTE, INTX_TIMEOUT, BAD_INTX_STATUS,        /* 4 */
	NO_MSI, MSI_TIMEOUT, BAD_MSI_STATUS, INTX_DURING_MSI, /* 5 */
};

/*
 * The transfer goes RAM -> edu -> RAM. The guest runs identity-mapped, so a
 * buffer's address is also its guest-physical address, which pyvmm makes
 * the device's DMA address. After a successful run, dma_dst (its address is
 * printed in the "dma ok" line) holds byte i = PATTERN(i) for i < DMA_SIZE.
 */
#define PATTERN(i) ((u8)((i) * 7 + 0xED))
static u8 dma_src[DMA_SIZE] __attribute__((aligned(4096)));
static u8 dma_dst[DMA_SIZE] __attribute__((aligned(4096)));

static uptr bar;
static volatile u32 intx_count, msi_count, irq_status;

static u32 edu_read(u32 reg) { return mmio_read32(bar + reg); }
static void edu_write(u32 reg, u32 v) { mmio_write32(bar + reg, v); }

/* Both handlers acknowledge at the device first, then EOI: for INTx the
 * line must be low before the EOI, or the IOAPIC would deliver it again. */
static void edu_acknowledge(void)
{
	irq_status = edu_read(EDU_IRQ_STATUS);
	edu_write(EDU_IRQ_ACK, irq_status);
	lapic_eoi();
}

__attribute__((interrupt)) static void intx_interrupt(struct interrupt_frame *frame)
{
	(void)frame;
	intx_count++;
	edu_acknowledge();
}

__attribute__((interrupt)) static void msi_interrupt(struct interrupt_frame *frame)
{
	(void)frame;
	msi_count++;
	edu_acknowledge();
}

static u32 factorial(u32 n)
{
	u32 start = ticks;

	edu_write(EDU_FACTORIAL, n);
	/* The device computes in a thread of its own: wait for it. */
	while (edu_read(EDU_STATUS) & EDU_STATUS_COMPUTING)
		if (!idle_wait(start, TIMEOUT_MS))
			fail(FACTORIAL_TIMEOUT, "factorial status", edu_read(EDU_STATUS), 0);
	return edu_read(EDU_FACTORIAL);
}

/* One transfer; edu runs it from a timer, about 100 ms later. */
static void dma(u64 src, u64 dst, u32 cmd)
{
	u32 start = ticks;

	barrier();  /* the source buffer is written before the device reads it */
	mmio_write64(bar + EDU_DMA_SRC, src);
	mmio_write64(bar + EDU_DMA_DST, dst);
	mmio_write64(bar + EDU_DMA_COUNT, DMA_SIZE);
	mmio_write64(bar + EDU_DMA_CMD, cmd | EDU_DMA_START);
	while (mmio_read64(bar + EDU_DMA_CMD) & EDU_DMA_START)
		if (!idle_wait(start, TIMEOUT_MS))
			fail(DMA_TIMEOUT, "dma command", mmio_read64(bar + EDU_DMA_CMD), 0);
	barrier();  /* and the destination is read only after it is written */
}

/* RAM -> edu -> RAM with the pattern XOR invert, and compare. */
static void dma_round(u8 invert)
{
	for (unsigned i = 0; i < DMA_SIZE; i++) {
		dma_src[i] = PATTERN(i) ^ invert;
		dma_dst[i] = 0;
	}
	dma((uptr)dma_src, EDU_BUFFER, 0);
	dma(EDU_BUFFER, (uptr)dma_dst, EDU_DMA_TO_RAM);
	for (unsigned i = 0; i < DMA_SIZE; i++) {
		u8 want = PATTERN(i) ^ invert;

		if (dma_dst[i] != want) {
			printf("FAIL: dma byte %u (got 0x%x, want 0x%x)\n", i, dma_dst[i], want);
			guest_exit(DMA_MISMATCH);
		}
	}
}

/* Raise an interrupt with value v and wait for *count to go up by one. */
static void raise_and_wait(volatile u32 *count, u32 v, u8 code, const char *what)
{
	u32 before = *count, start = ticks;

	edu_write(EDU_IRQ_RAISE, v);
	while (*count == before)
		if (!idle_wait(start, TIMEOUT_MS))
			fail(code, what, *count, before + 1);
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct pci_dev dev;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();

	/* 1. Find the device; check ECAM agrees with mechanism #1. */
	pci_require(EDU_VENDOR, EDU_DEVICE, &dev);
	printf("edu: found %04x:%04x at ", EDU_VENDOR, EDU_DEVICE);
	pci_print_location(&dev);
	print("\n");
	expect(ECAM_MISMATCH, "ids through ecam", pci_ecam_read32(&dev, PCI_VENDOR_ID),
	       pci_read32(&dev, PCI_VENDOR_ID));
	printf("edu: ecam agrees: %08x\n", pci_ecam_read32(&dev, PCI_VENDOR_ID));

	bar = pci_require_memory_bar(&dev, 0, BAD_BAR0);
	printf("edu: bar0 0x%llx, interrupt line %u\n", (u64)bar,
	       pci_read8(&dev, PCI_INTERRUPT_LINE));

	/* 2. Registers. Memory decoding on, and bus mastering for the DMA. */
	pci_command(&dev, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0);
	interrupts_init();
	expect(BAD_ID, "id register", edu_read(EDU_ID), 0x010000ed);
	printf("edu: id 0x%08x\n", edu_read(EDU_ID));
	static const u32 values[] = { 0, 0x12345678, 0xdeadbeef, 0xffffffff };
	for (unsigned i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
		edu_write(EDU_LIVENESS, values[i]);
		expect(BAD_LIVENESS, "liveness", edu_read(EDU_LIVENESS), ~values[i]);
	}
	print("edu: liveness ok\n");
	expect(BAD_FACTORIAL, "5!", factorial(5), 120);
	expect(BAD_FACTORIAL, "10!", factorial(10), 3628800);
	print("edu: 5! = 120, 10! = 3628800\n");

	/* 3. DMA both ways, twice: edu's buffer keeps its contents from one run
	 * to the next, so the first round (inverted pattern) proves that this
	 * run's data went through, whatever an earlier run left there. */
	if ((uptr)dma_src + DMA_SIZE > EDU_DMA_LIMIT || (uptr)dma_dst + DMA_SIZE > EDU_DMA_LIMIT)
		fail(DMA_OUT_OF_REACH, "dma buffer end", (uptr)dma_dst + DMA_SIZE, EDU_DMA_LIMIT);
	dma_round(0xFF);
	dma_round(0);
	printf("edu: dma first bytes %02x %02x %02x %02x\n", dma_dst[0], dma_dst[1],
	       dma_dst[2], dma_dst[3]);
	printf("dma ok: %u bytes at 0x%llx\n", DMA_SIZE, (u64)(uptr)dma_dst);

	/* 4. INTx: a level-triggered IOAPIC input, the GSI in the interrupt
	 * line register. Clear whatever an earlier user left raised first. */
	u8 gsi = pci_read8(&dev, PCI_INTERRUPT_LINE);

	expect(BAD_INTX_ROUTE, "interrupt pin", pci_read8(&dev, PCI_INTERRUPT_PIN), 1);
	edu_write(EDU_IRQ_ACK, 0xffffffff);
	idt_set_gate(INTX_VECTOR, intx_interrupt);
	idt_set_gate(MSI_VECTOR, msi_interrupt);
	pci_command(&dev, 0, PCI_COMMAND_INTX_DISABLE);
	if (ioapic_route(gsi, INTX_VECTOR, 1))
		fail(BAD_INTX_ROUTE, "interrupt line is an ioapic input", gsi, 16);
	for (u32 n = 1; n <= 3; n++) {
		raise_and_wait(&intx_count, 0x1000 + n, INTX_TIMEOUT, "intx interrupts");
		expect(BAD_INTX_STATUS, "intx status", irq_status, 0x1000 + n);
		printf("intx %u ok (status 0x%x)\n", n, irq_status);
	}

	/* 5. MSI. The capability's layout depends on its 64-bit flag (bit 7 of
	 * message control): the data register sits at +8, or at +0xC after an
	 * upper address dword. Per-vector masking (bit 8) adds a mask register
	 * after the data, cleared here. INTx stays routed, so an INTx that
	 * should not come any more would be counted. */
	u8 msi = pci_find_cap(&dev, PCI_CAP_ID_MSI);

	if (!msi)
		fail(NO_MSI, "msi capability", 0, PCI_CAP_ID_MSI);
	u16 control = pci_read16(&dev, msi + 2);
	u8 data = (control & 0x80) ? 0x0C : 0x08;

	pci_write32(&dev, msi + 4, msi_address());
	if (control & 0x80)
		pci_write32(&dev, msi + 8, 0);
	pci_write16(&dev, msi + data, MSI_VECTOR);
	if (control & 0x100)
		pci_write32(&dev, msi + data + 4, 0);
	/* Enable (bit 0), one vector (multiple message enable, bits 6:4, 0). */
	pci_write16(&dev, msi + 2, (u16)((control & ~0x70) | 1));
	pci_command(&dev, PCI_COMMAND_INTX_DISABLE, 0);
	printf("edu: msi capability at 0x%x, %s-bit, vector 0x%x\n", msi,
	       (control & 0x80) ? "64" : "32", MSI_VECTOR);
	for (u32 n = 1; n <= 3; n++) {
		raise_and_wait(&msi_count, 0x2000 + n, MSI_TIMEOUT, "msi interrupts");
		expect(BAD_MSI_STATUS, "msi status", irq_status, 0x2000 + n);
		expect(INTX_DURING_MSI, "intx count during msi", intx_count, 3);
		printf("msi %u ok\n", n);
	}
	print("edu: all ok\n");
	return 0;
}
