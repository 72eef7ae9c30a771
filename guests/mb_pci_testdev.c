/*
 * QEMU's pci-testdev (1b36:0005, hw/misc/pci-testdev.c), driven as
 * kvm-unit-tests' pci test drives it:
 *   pyvmm run mb_pci_testdev --device pci-testdev,membar=0x100000
 *   qemu-system-x86_64 -kernel mb_pci_testdev.elf \
 *       -device pci-testdev,membar=0x100000 \
 *       -device isa-debug-exit,iobase=0xf4,iosize=4
 * It finds the function by a mechanism #1 scan of bus 0 and prints, a line
 * each: its identity (vendor, device, class, header type, subsystem,
 * interrupt pin); each BAR's kind and size, found by writing all ones and
 * reading back, as firmware sizes them; then, with I/O and memory decoding
 * on, the tests behind BAR 0 (mmio) and BAR 1 (portio): select test t at
 * offset 0, check its header (count 0, width 1), write its data byte to its
 * offset WRITES times, then one other byte, and read the count back. The
 * eventfd tests' writes go to KVM ioeventfds (under QEMU and pyvmm alike),
 * so their count stays 0; as in kvm-unit-tests, a count of 0 or of the
 * writes passes, and the count is printed. Test 3 of each kind selects
 * nothing: its width reads 0.
 * Addresses and slots are the firmware's choice, so none is printed.
 * Output ends with "mb_pci_testdev: all ok" and power-off; a failed check
 * prints "FAIL: ..." and exits with its own code (enum failure).
 */
#include "runtime.h"
#include "multiboot.h"
#include "pci.h"

enum failure {
	F_NOT_FOUND = PCI_NOT_FOUND,
	F_MAGIC,
	F_BAR,
	F_HEADER,
	F_COUNT,
	F_TESTS,
};

#define TESTDEV_VENDOR 0x1B36
#define TESTDEV_DEVICE 0x0005
#define PCI_CLASS_REVISION 0x08
#define PCI_HEADER_TYPE 0x0E
#define PCI_SUBSYSTEM_VENDOR_ID 0x2C

/* The header of the selected test (QEMU's PCITestDevHdr). */
#define HDR_TEST 0
#define HDR_WIDTH 1
#define HDR_OFFSET 4
#define HDR_DATA 8
#define HDR_COUNT 12
#define HDR_NAME 16
#define NAME_MAX 32

#define WRITES 16
#define TESTS_PER_KIND 3

/* One BAR's registers through either kind of access. */
struct window {
	const char *kind;
	int is_io;
	u32 base;
};

static u8 window_read8(const struct window *w, u32 off)
{
	return w->is_io ? inb((u16)(w->base + off)) : mmio_read8(w->base + off);
}

static u32 window_read32(const struct window *w, u32 off)
{
	return w->is_io ? inl((u16)(w->base + off)) : mmio_read32(w->base + off);
}

static void window_write8(const struct window *w, u32 off, u8 v)
{
	if (w->is_io)
		outb((u16)(w->base + off), v);
	else
		mmio_write8(w->base + off, v);
}

/* Size BAR n the way firmware does: all ones, read back, restore. Returns the
 * BAR's value; *size gets its size (the high dword too for a 64-bit BAR). */
static u32 size_bar(const struct pci_dev *d, unsigned n, u64 *size)
{
	u8 off = PCI_BAR0 + 4 * n;
	u32 value = pci_read32(d, off), mask;
	u64 high_mask = 0xFFFFFFFFu;

	pci_write32(d, off, 0xFFFFFFFFu);
	mask = pci_read32(d, off);
	pci_write32(d, off, value);
	if (!value && !mask) {
		*size = 0;
		return 0;
	}
	if (value & 1) {
		*size = (u64)(~(mask & ~3u) + 1) & 0xFFFF;
		return value;
	}
	if ((value & 6) == 4) {
		u32 high = pci_read32(d, off + 4);

		pci_write32(d, off + 4, 0xFFFFFFFFu);
		high_mask = pci_read32(d, off + 4);
		pci_write32(d, off + 4, high);
	}
	*size = ~(((u64)high_mask << 32) | (mask & ~0xFu)) + 1;
	if ((value & 6) != 4)
		*size &= 0xFFFFFFFFu;
	return value;
}

static void print_bars(const struct pci_dev *d)
{
	for (unsigned n = 0; n < 6; n++) {
		u64 size;
		u32 value = size_bar(d, n, &size);

		if (!size) {
			printf("bar %u: none\n", n);
			continue;
		}
		if (value & 1)
			printf("bar %u: i/o, %u ports\n", n, (u32)size);
		else
			printf("bar %u: memory, %s%s, 0x%llx bytes\n", n,
			       (value & 6) == 4 ? "64-bit" : "32-bit",
			       value & 8 ? ", prefetchable" : "", size);
		if ((value & 7) == 4)
			n++;  /* the high dword of a 64-bit BAR */
	}
}

/* kvm-unit-tests' pci_testdev_one: 0 once a test index selects nothing. */
static int run_test(const struct window *w, unsigned t)
{
	char name[NAME_MAX];
	u32 offset, count;
	u8 data, width;
	unsigned i;

	window_write8(w, HDR_TEST, (u8)t);
	width = window_read8(w, HDR_WIDTH);
	if (!width) {
		guest_expect(F_HEADER, "count with no test", window_read32(w, HDR_COUNT), 0);
		printf("%s test %u: none (width reads 0)\n", w->kind, t);
		return 0;
	}
	guest_expect(F_HEADER, "width", width, 1);
	/* QEMU numbers its tests mmio first: portio test t is number 3 + t. */
	guest_expect(F_HEADER, "test number", window_read8(w, HDR_TEST),
		     t + (w->is_io ? TESTS_PER_KIND : 0));
	guest_expect(F_HEADER, "count after selecting", window_read32(w, HDR_COUNT), 0);
	offset = window_read32(w, HDR_OFFSET);
	data = window_read8(w, HDR_DATA);
	for (i = 0; i < NAME_MAX - 1; i++) {
		name[i] = (char)window_read8(w, HDR_NAME + i);
		if (!name[i])
			break;
	}
	name[i] = 0;
	for (i = 0; i < WRITES; i++)
		window_write8(w, offset, data);
	/* A byte of other data at the offset counts only where any data matches. */
	window_write8(w, offset, (u8)~data);
	count = window_read32(w, HDR_COUNT);
	if (count != 0 && count != WRITES && count != WRITES + 1)
		guest_fail(F_COUNT, "count: 0 (ioeventfd) or the writes", count, WRITES);
	if (count == WRITES + 1 && data == 0xFA)
		guest_fail(F_COUNT, "datamatch counted other data", count, WRITES);
	printf("%s test %u: \"%s\", offset 0x%x, data 0x%x: count %u\n", w->kind, t, name, offset,
	       data, count);
	return 1;
}

static void run_tests(const struct window *w)
{
	unsigned t = 0;

	while (run_test(w, t))
		t++;
	guest_expect(F_TESTS, "tests of a kind", t, TESTS_PER_KIND);
}

/* BAR 2 (membar=N), an empty region in QEMU: what a read of it gives (where 32-bit
 * code reaches it: firmware may place it above 4 GiB). */
static void read_membar(const struct pci_dev *d)
{
	u32 low = pci_read32(d, PCI_BAR0 + 8), high = pci_read32(d, PCI_BAR0 + 12);

	if (!low || high)
		return;
	printf("bar 2: reads 0x%x\n", mmio_read32(low & ~0xFu));
}

int multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
	struct pci_dev d;
	struct window memory = { "mmio", 0, 0 }, io = { "portio", 1, 0 };

	(void)mbi;
	guest_expect(F_MAGIC, "multiboot magic", magic, MULTIBOOT_BOOTLOADER_MAGIC);
	if (pci_find(TESTDEV_VENDOR, TESTDEV_DEVICE, &d))
		guest_fail(F_NOT_FOUND, "1b36:0005 on bus 0", 0, 1);
	printf("pci-testdev: %04x:%04x class %06x revision %u header type %u subsystem "
	       "%04x:%04x interrupt pin %u\n", pci_read16(&d, PCI_VENDOR_ID),
	       pci_read16(&d, PCI_DEVICE_ID), pci_read32(&d, PCI_CLASS_REVISION) >> 8,
	       pci_read8(&d, PCI_CLASS_REVISION), pci_read8(&d, PCI_HEADER_TYPE),
	       pci_read16(&d, PCI_SUBSYSTEM_VENDOR_ID), pci_read16(&d, PCI_SUBSYSTEM_VENDOR_ID + 2),
	       pci_read8(&d, PCI_INTERRUPT_PIN));
	print_bars(&d);
	memory.base = pci_read32(&d, PCI_BAR0) & ~0xFu;
	io.base = pci_read32(&d, PCI_BAR0 + 4) & ~3u;
	guest_expect(F_BAR, "bar 0 placed", memory.base != 0, 1);
	guest_expect(F_BAR, "bar 1 placed", io.base != 0, 1);
	pci_write16(&d, PCI_COMMAND,
		    pci_read16(&d, PCI_COMMAND) | PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
	run_tests(&memory);
	run_tests(&io);
	read_membar(&d);
	print("mb_pci_testdev: all ok\n");
	return 0;
}
