/*
 * Brings up QEMU's NVMe controller (hw/nvme/ctrl.c) assigned to the guest
 * and sends it three Identify Controller commands on the admin queue, each
 * completion signalled by an MSI-X interrupt. The register and queue
 * layouts are the NVMe 1.4 specification's (section 3.1 for the registers,
 * 4.2 and 4.6 for the queue entries, 7.6.1 for controller initialisation).
 */
#include "apic.h"
#include "pci.h"

/* QEMU's controller is 1b36:0010 (Red Hat) by default, 8086:5845 with
 * use-intel-id=on. Either will do. */
static const u16 nvme_ids[][2] = { { 0x8086, 0x5845 }, { 0x1b36, 0x0010 } };

/* Controller registers in BAR0. The 64-bit ones are accessed as two dwords,
 * which NVMe allows and which needs no 8-byte MMIO support anywhere. */
#define NVME_CAP 0x00
#define  CAP_MQES(lo) ((lo) & 0xFFFF)          /* largest queue - 1 */
#define  CAP_TO(lo) (((lo) >> 24) & 0xFF)      /* ready timeout, 500 ms units */
#define  CAP_DSTRD(hi) ((hi) & 0xF)            /* doorbell stride 4 << DSTRD */
#define  CAP_CSS_NVM(hi) ((hi) & 0x20)         /* NVM command set (bit 37) */
#define  CAP_MPSMIN(hi) (((hi) >> 16) & 0xF)   /* smallest page 4 KiB << MPSMIN */
#define NVME_VS 0x08
#define NVME_CC 0x14
#define  CC_ENABLE 0x1
#define  CC_IOSQES (6 << 16)   /* I/O queue entry sizes, 2^6 and 2^4 bytes; */
#define  CC_IOCQES (4 << 20)   /* older QEMUs check them at enable time */
#define NVME_CSTS 0x1C
#define  CSTS_READY 0x1
#define  CSTS_FATAL 0x2
#define NVME_AQA 0x24          /* admin queue sizes - 1: CQ in 27:16, SQ in 11:0 */
#define NVME_ASQ 0x28
#define NVME_ACQ 0x30
#define NVME_DOORBELLS 0x1000  /* queue q: SQ tail, then CQ head, a stride apart */

/* MSI-X capability (PCI 3.0, 6.8.2) and its table of 16-byte entries. */
#define MSIX_CONTROL 2
#define  MSIX_ENABLE 0x8000
#define  MSIX_FUNCTION_MASK 0x4000
#define MSIX_TABLE 4           /* BAR index (BIR) in bits 2:0, offset above */
#define MSIX_PBA 8             /* pending bits, laid out the same way */
#define ENTRY_ADDRESS_LOW 0
#define ENTRY_ADDRESS_HIGH 4
#define ENTRY_DATA 8
#define ENTRY_CONTROL 12
#define  ENTRY_MASKED 1

#define QUEUE_ENTRIES 8
#define NVME_VECTOR 0x40
#define OPCODE_IDENTIFY 0x06
#define CNS_CONTROLLER 1

enum failure {
	NOT_FOUND = PCI_NOT_FOUND, BAD_BAR0, NO_MSIX, BAD_MSIX_TABLE, BAD_CAP, DISABLE_TIMEOUT,
	ENABLE_TIMEOUT, NO_INTERRUPT, BAD_PHASE, BAD_STATUS, BAD_COMMAND_ID, BAD_IDENTIFY,
};

struct nvme_command {          /* submission queue entry */
	u32 cdw0;              /* opcode 7:0, command id 31:16 */
	u32 nsid;
	u64 reserved;
	u64 mptr;
	u64 prp1;              /* first data page */
	u64 prp2;
	u32 cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct nvme_completion {       /* completion queue entry */
	u32 result;
	u32 reserved;
	u16 sq_head;
	u16 sq_id;
	u16 command_id;
	u16 status;            /* bit 0: phase tag; 15:1: status, 0 = success */
};

_Static_assert(sizeof(struct nvme_command) == 64, "64-byte SQ entries (IOSQES 6)");
_Static_assert(sizeof(struct nvme_completion) == 16, "16-byte CQ entries (IOCQES 4)");

/* DMA memory: the admin queues (page aligned, as ASQ/ACQ require) and one
 * page for the Identify data (PRP1 alone covers a page-aligned 4 KiB). */
static struct nvme_command asq[QUEUE_ENTRIES] __attribute__((aligned(4096)));
static volatile struct nvme_completion acq[QUEUE_ENTRIES] __attribute__((aligned(4096)));
static u8 identify[4096] __attribute__((aligned(4096)));

static uptr bar;
static u32 stride, ready_timeout_ms;
static u32 sq_tail, cq_head, phase = 1;  /* the controller posts phase 1 first */
static volatile u32 irq_count;

static u32 nvme_read(u32 reg) { return mmio_read32(bar + reg); }
static void nvme_write(u32 reg, u32 v) { mmio_write32(bar + reg, v); }

/* MSI-X is edge-triggered and the device needs no acknowledgement. */
__attribute__((interrupt)) static void nvme_interrupt(struct interrupt_frame *frame)
{
	(void)frame;
	irq_count++;
	lapic_eoi();
}

/* Entry 0 of the table (the admin completion queue uses vector 0) sends
 * NVME_VECTOR to this CPU; then MSI-X on, function mask off. */
static void msix_setup(const struct pci_dev *dev)
{
	u8 cap = pci_find_cap(dev, PCI_CAP_ID_MSIX);

	if (!cap)
		fail(NO_MSIX, "msi-x capability", 0, PCI_CAP_ID_MSIX);
	u16 control = pci_read16(dev, cap + MSIX_CONTROL);
	u32 table = pci_read32(dev, cap + MSIX_TABLE), pba = pci_read32(dev, cap + MSIX_PBA);
	struct pci_bar table_bar = pci_read_bar(dev, table & 7);

	if (table_bar.io || !table_bar.address || table_bar.address >= 0x100000000ull) {
		printf("FAIL: msi-x table bar %u (got 0x%llx, want memory below 4 GiB)\n",
		       table & 7, table_bar.address);
		guest_exit(BAD_MSIX_TABLE);
	}
	uptr entry = (uptr)table_bar.address + (table & ~7u);

	printf("nvme: msi-x: %u vectors, table in bar %u at 0x%x, pba in bar %u at 0x%x\n",
	       (control & 0x7FF) + 1, table & 7, table & ~7u, pba & 7, pba & ~7u);
	mmio_write32(entry + ENTRY_CONTROL, ENTRY_MASKED);
	mmio_write32(entry + ENTRY_ADDRESS_LOW, msi_address());
	mmio_write32(entry + ENTRY_ADDRESS_HIGH, 0);
	mmio_write32(entry + ENTRY_DATA, NVME_VECTOR);
	mmio_write32(entry + ENTRY_CONTROL, 0);
	expect(BAD_MSIX_TABLE, "msi-x entry 0 data", mmio_read32(entry + ENTRY_DATA), NVME_VECTOR);
	pci_write16(dev, cap + MSIX_CONTROL,
		    (u16)((control | MSIX_ENABLE) & ~MSIX_FUNCTION_MASK));
}

/* Wait for CSTS.RDY to read as ready (0 or 1), failing on a fatal status. */
static void wait_ready(u32 ready, u8 code)
{
	u32 start = ticks, csts;

	while (((csts = nvme_read(NVME_CSTS)) & CSTS_READY) != ready) {
		if ((csts & CSTS_FATAL) || !idle_wait(start, ready_timeout_ms))
			fail(code, "csts", csts, ready);
	}
}

static void controller_enable(void)
{
	u32 cap_lo = nvme_read(NVME_CAP), cap_hi = nvme_read(NVME_CAP + 4);
	u32 version = nvme_read(NVME_VS);

	printf("nvme: cap 0x%08x%08x, version %u.%u\n", cap_hi, cap_lo, version >> 16,
	       (version >> 8) & 0xFF);
	if (!CAP_CSS_NVM(cap_hi))
		fail(BAD_CAP, "cap.css nvm command set", cap_hi, cap_hi | 0x20);
	expect(BAD_CAP, "cap.mpsmin (4 KiB pages)", CAP_MPSMIN(cap_hi), 0);
	if (CAP_MQES(cap_lo) + 1 < QUEUE_ENTRIES)
		fail(BAD_CAP, "cap.mqes", CAP_MQES(cap_lo), QUEUE_ENTRIES - 1);
	stride = 4u << CAP_DSTRD(cap_hi);
	ready_timeout_ms = (CAP_TO(cap_lo) + 1) * 500;

	/* The admin queue registers may only change while disabled. */
	if (nvme_read(NVME_CC) & CC_ENABLE)
		nvme_write(NVME_CC, 0);
	wait_ready(0, DISABLE_TIMEOUT);
	nvme_write(NVME_AQA, ((QUEUE_ENTRIES - 1) << 16) | (QUEUE_ENTRIES - 1));
	nvme_write(NVME_ASQ, (u32)(uptr)asq);
	nvme_write(NVME_ASQ + 4, 0);
	nvme_write(NVME_ACQ, (u32)(uptr)acq);
	nvme_write(NVME_ACQ + 4, 0);
	/* NVM command set, 4 KiB pages, round-robin arbitration: all zero. */
	nvme_write(NVME_CC, CC_ENABLE | CC_IOSQES | CC_IOCQES);
	wait_ready(CSTS_READY, ENABLE_TIMEOUT);
	printf("nvme: controller ready, admin queues of %u entries\n", QUEUE_ENTRIES);
}

/* One Identify Controller: submit, wait for the interrupt, check, consume. */
static void identify_controller(u32 n, u16 vendor)
{
	u16 command_id = (u16)(0x1D00 + n);
	u32 before = irq_count, start = ticks;

	memset(identify, 0, sizeof(identify));  /* so this run's data shows */
	memset(&asq[sq_tail], 0, sizeof(asq[0]));
	asq[sq_tail].cdw0 = OPCODE_IDENTIFY | ((u32)command_id << 16);
	asq[sq_tail].prp1 = (uptr)identify;
	asq[sq_tail].cdw10 = CNS_CONTROLLER;
	sq_tail = (sq_tail + 1) % QUEUE_ENTRIES;
	barrier();
	nvme_write(NVME_DOORBELLS + 0 * stride, sq_tail);  /* admin SQ tail */

	while (irq_count == before)
		if (!idle_wait(start, TIMEOUT_MS))
			fail(NO_INTERRUPT, "msi-x interrupts", irq_count, before + 1);
	barrier();

	volatile struct nvme_completion *cqe = &acq[cq_head];

	expect(BAD_PHASE, "completion phase", cqe->status & 1, phase);
	expect(BAD_STATUS, "completion status", cqe->status >> 1, 0);
	expect(BAD_COMMAND_ID, "completion command id", cqe->command_id, command_id);
	/* Identify Controller starts with the PCI vendor ID. */
	expect(BAD_IDENTIFY, "identify vendor id", identify[0] | (identify[1] << 8), vendor);
	cq_head = (cq_head + 1) % QUEUE_ENTRIES;
	if (cq_head == 0)
		phase ^= 1;  /* the controller flips the phase on each wrap */
	nvme_write(NVME_DOORBELLS + 1 * stride, cq_head);  /* admin CQ head */
	printf("nvme identify %u ok: msix vector interrupt\n", n);
}

/* The model number: identify bytes 24-63, ASCII padded with spaces. */
static void print_model(void)
{
	const char *model = (const char *)identify + 24;
	int len = 40;

	while (len > 0 && (model[len - 1] == ' ' || model[len - 1] == 0))
		len--;
	print("nvme: model \"");
	for (int i = 0; i < len; i++)
		serial_putc(model[i] >= 0x20 && model[i] < 0x7F ? model[i] : '?');
	print("\"\n");
}

int guest_main(unsigned cpu, unsigned ncpus)
{
	struct pci_dev dev;
	unsigned i;

	(void)ncpus;
	if (cpu != 0)
		guest_halt();
	i = pci_require_any(nvme_ids, 2, &dev);

	bar = pci_require_memory_bar(&dev, 0, BAD_BAR0);
	printf("nvme: found %04x:%04x at ", nvme_ids[i][0], nvme_ids[i][1]);
	pci_print_location(&dev);
	printf(", bar0 0x%llx\n", (u64)bar);

	/* Memory decoding, bus mastering (queues, data and MSI-X messages are
	 * all DMA), and INTx off: MSI-X only. */
	pci_command(&dev, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE, 0);
	interrupts_init();
	idt_set_gate(NVME_VECTOR, nvme_interrupt);
	msix_setup(&dev);
	controller_enable();
	for (u32 n = 1; n <= 3; n++) {
		identify_controller(n, nvme_ids[i][0]);
		if (n == 1)
			print_model();
	}
	print("nvme: all ok\n");
	return 0;
}
